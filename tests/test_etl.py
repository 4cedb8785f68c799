"""The Dask ETL: same features as the plain pandas transform, on a local cluster and on a real
multi-process Dask cluster reached by settings alone."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from core.features import SPLIT_COLUMN, join_lookups, prepare_lookups, transform
from core.ingest import batch_fingerprint, write_batch
from core.lake import Lake
from core.settings import DaskSettings
from core.validation import validate
from tests.conftest import free_port, need_service

FEATURE_TABLES = ("flights", "weather", "planes", "airports")


def fill_lake(lake: Lake, contract, raw, every: int) -> Lake:
    """Raw tables of every ``every``-th flight (and all lookup rows), written through the gate."""
    for table in FEATURE_TABLES:
        batch = raw[table]
        if table == "flights":
            batch = batch.iloc[::every].reset_index(drop=True)
        result = validate(batch, table, contract.tables[table])
        write_batch(lake, contract, result, "test", batch_fingerprint(batch))
    return lake


@pytest.fixture(scope="module")
def sample_lake(tmp_path_factory, flights_contract, flights_raw) -> Lake:
    """Raw tables of every 40th flight (and all lookup rows), written through the gate."""
    return fill_lake(Lake(str(tmp_path_factory.mktemp("lake"))), flights_contract, flights_raw, 40)


def canonical(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows in a canonical order (partitions may come back in any order), split as string."""
    frame = frame.assign(**{SPLIT_COLUMN: frame[SPLIT_COLUMN].astype("string")})
    return frame.sort_values(list(frame.columns), kind="stable").reset_index(drop=True)


def pandas_features(lake: Lake, contract, stats) -> pd.DataFrame:
    raw = {t: lake.read_pandas(lake.uri("raw", "flights", t)) for t in FEATURE_TABLES}
    joined = join_lookups(raw["flights"], prepare_lookups(raw, contract), contract)
    out = transform(joined, contract, stats)
    return out[out[contract.target.name].notna()].reset_index(drop=True)


def test_dask_partitions_and_pandas_give_identical_features(sample_lake, flights_contract):
    from compute.dask_session import dask_client
    from compute.etl import build_feature_table, load_stats

    with dask_client(DaskSettings(partition_rows=1_000)) as client:
        built = build_feature_table(sample_lake, flights_contract, dict.fromkeys(FEATURE_TABLES, 1),
                                    client, partition_rows=1_000)
    assert sum(built.rows_by_split.values()) > 7_000
    from_dask = sample_lake.read_pandas(built.feature_uri)
    stats = load_stats(sample_lake, built.feature_uri)
    assert stats == built.stats
    expected = pandas_features(sample_lake, flights_contract, stats)
    pd.testing.assert_frame_equal(canonical(from_dask), canonical(expected), check_dtype=False)
    features = [*flights_contract.features.categorical, *flights_contract.features.numeric]
    assert from_dask[features].dtypes.to_dict() == expected[features].dtypes.to_dict()


def test_an_empty_split_is_refused_naming_it_and_nothing_is_written(sample_lake, flights_contract):
    """Found: a split whose boundaries miss the data wrote a table without a validation split,
    and training failed later without naming the cause."""
    from compute.dask_session import dask_client
    from compute.etl import build_feature_table
    from core.features import FeatureError

    late = flights_contract.model_copy(update={"split": flights_contract.split.model_copy(
        update={"train_end": "2013-12-20", "validation_end": "2014-03-01"})})
    feature_uri = sample_lake.uri("features", "flights")
    before = sample_lake.latest_version(feature_uri)
    with dask_client(DaskSettings(partition_rows=5_000)) as client:
        with pytest.raises(FeatureError) as info:
            build_feature_table(sample_lake, late, dict.fromkeys(FEATURE_TABLES, 1), client, 5_000)
    message = str(info.value)
    assert "the test split is empty" in message and "2014-03-01" in message
    assert "time column runs from 2013-01-01" in message
    assert sample_lake.latest_version(feature_uri) == before


def test_a_build_that_fails_at_its_commit_leaves_no_file_of_its_own_in_the_table(sample_lake, flights_contract,
                                                                                   monkeypatch):
    """Each partition writes its own data file before the one commit: when the commit fails
    (here the store refuses it), the files already written are deleted, and the table and its
    folder are as they were."""
    from compute.dask_session import dask_client
    from compute.etl import build_feature_table

    feature_uri = sample_lake.uri("features", "flights")
    with dask_client(DaskSettings(partition_rows=2_000)) as client:
        build_feature_table(sample_lake, flights_contract, dict.fromkeys(FEATURE_TABLES, 1), client, 2_000)
    folder = Path(feature_uri)
    before = (sample_lake.latest_version(feature_uri), sorted(p.name for p in folder.iterdir()))

    def refused(*args, **kwargs):
        raise OSError("the store refused the commit")

    monkeypatch.setattr(Lake, "commit_files", refused)
    with dask_client(DaskSettings(partition_rows=2_000)) as client:
        with pytest.raises(OSError, match="refused"):
            build_feature_table(sample_lake, flights_contract, dict.fromkeys(FEATURE_TABLES, 1), client, 2_000)
    assert (sample_lake.latest_version(feature_uri), sorted(p.name for p in folder.iterdir())) == before


@pytest.fixture
def dask_cluster():
    """`dask scheduler` plus two `dask worker` processes on 127.0.0.1."""
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "dask").exists():
        need_service("the dask CLI is not installed in this environment")
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", str(port), "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    for _ in range(2):
        procs.append(subprocess.Popen([str(bin_dir / "dask"), "worker", address, "--nthreads", "1",
                                       "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "2GB"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                      env={**os.environ, "PYTHONPATH": str(Path.cwd())}))
    from dask.distributed import Client

    deadline = time.time() + 60
    while True:
        try:
            with Client(address, timeout="5s") as client:
                if len(client.scheduler_info()["workers"]) == 2:
                    break
        except OSError:
            pass
        if time.time() > deadline:
            for proc in procs:
                proc.kill()
            pytest.fail("the Dask cluster did not come up with two workers in 60 s")
        time.sleep(0.5)
    yield address
    for proc in reversed(procs):
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=30)


@pytest.mark.integration
@pytest.mark.slow
def test_etl_flow_runs_on_a_remote_scheduler_by_settings_alone(
        home, prefect_harness, dask_cluster, sample_lake, flights_contract):
    from dask.distributed import Client

    from core.settings import configure
    from flows.etl import EtlParams, etl

    configure(home=str(home.home), lake_root=sample_lake.root,
              dask={"address": dask_cluster, "partition_rows": 1_000})
    result = etl(EtlParams(refresh=True))
    assert not result.cached
    with Client(dask_cluster) as client:  # the work ran on the two worker processes
        assert len(client.scheduler_info()["workers"]) == 2
        executed = client.run(lambda dask_worker: len(dask_worker.data) + dask_worker.state.executed_count)
    assert sum(executed.values()) > 0 and all(v > 0 for v in executed.values())
    from compute.etl import load_stats

    stats = load_stats(sample_lake, result.feature_uri, result.feature_version)
    remote = sample_lake.read_pandas(result.feature_uri, result.feature_version)
    pd.testing.assert_frame_equal(canonical(remote),
                                  canonical(pandas_features(sample_lake, flights_contract, stats)),
                                  check_dtype=False)


def test_a_table_appended_over_time_reads_in_the_order_its_rows_landed(tmp_path):
    """Found: Delta lists the newest commit's files first, so a stream-fed table (one file per
    micro-batch) fed training newest first, and the same rows landed as one file trained a
    different model (ROC AUC 0.687 vs 0.681 on the demo's January-March)."""
    import pyarrow as pa

    from compute.etl import _read_table, file_groups, partition_plan
    from core.lake import Lake

    lake = Lake(str(tmp_path / "lake"))
    uri = lake.uri("raw", "events", "events")
    for day in range(5):
        lake.append(uri, pa.table({"id": list(range(day * 10, day * 10 + 10))}), {"flywheel.day": day})
    assert lake.read_pandas(uri)["id"].tolist() == list(range(50))
    # The ETL's partitions, in the order build_feature_table commits their files.
    ids = []
    for paths, pieces in partition_plan(file_groups(lake, uri, lake.table(uri).version(), 20), 15):
        read = _read_table(paths, ["id"], None)
        for start, length in pieces:
            ids += read.slice(start, length).column("id").to_pylist()
    assert ids == list(range(50))


@pytest.mark.slow
def test_the_etl_reads_and_writes_a_lake_on_object_storage(s3_server, monkeypatch, flights_contract, flights_raw):
    """The workers read the raw files and write the feature table's data files on S3 (moto's
    server), reached by the standard AWS environment alone; the commit holds every row."""
    from compute.dask_session import dask_client
    from compute.etl import build_feature_table, load_stats

    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    lake = fill_lake(Lake(f"s3://{s3_server.bucket(f'etl-{int(time.time() * 1000)}')}/lake"), flights_contract,
                     flights_raw, 80)
    with dask_client(DaskSettings(partition_rows=1_500)) as client:
        built = build_feature_table(lake, flights_contract, dict.fromkeys(FEATURE_TABLES, 1), client,
                                    partition_rows=1_500)
    assert len(lake.file_uris(built.feature_uri)) > 1  # one data file per partition
    stats = load_stats(lake, built.feature_uri)
    pd.testing.assert_frame_equal(lake.read_pandas(built.feature_uri),
                                  pandas_features(lake, flights_contract, stats), check_dtype=False)
