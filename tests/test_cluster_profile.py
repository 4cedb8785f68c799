"""The cluster profile end to end, every part remote, reached by configuration alone:

- the lake and the shared root (reports, monitor state) on S3 (moto's server on 127.0.0.1;
  real AWS takes the same variables without the endpoint);
- MLflow: ``mlflow server`` on PostgreSQL, artifacts on S3 through the server's proxy (clients
  get no S3 endpoint for MLflow);
- Prefect: ``prefect server`` on PostgreSQL;
- compute: a two-node Ray cluster (``compute.ray_cluster``, one CPU a node, so every trial's
  Ray Train group spans both nodes) and a ``dask scheduler`` with a worker;
- Evidently: an ``evidently ui`` service keeps the monitoring runs.

ingest -> ETL -> train (small) -> serve -> predictions and feedback -> monitor run as a person
would run them, each ``python -m flows.<name>`` in its own process. Afterwards nothing but
caches, logs and the local service's process files is under ``FLYWHEEL_HOME``, and no
credential is in a log, a file, a Delta commit, an MLflow tag or param, or a Prefect artifact.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from devstack.stack import _wait_http
from tests.conftest import (
    REPO,
    PrefectServer,
    free_port,
    register_deployments,
    write_interaction_dataset,
)

pytestmark = [pytest.mark.slow, pytest.mark.integration]

BUCKET = "flywheel-cluster"
# What may be under FLYWHEEL_HOME afterwards: caches (the model export before MLflow, Prefect's
# persisted task results, BentoML's per-server folder), and the local service's process file,
# log and Prometheus target file (prometheus/targets/). Everything a second machine needs is remote.
ALLOWED_UNDER_HOME = {"cache", "prefect-results", "bentoml", "serving", "prometheus"}


def _database(server, name: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(server.url(), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        if not connection.execute(sa.text("select 1 from pg_database where datname = :n"), {"n": name}).scalar():
            connection.execute(sa.text(f'create database "{name}"'))
    engine.dispose()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, postgres_server, s3_server):
    """Every server of the cluster profile; yields the environment a person's shell would have."""
    work = tmp_path_factory.mktemp("cluster")
    contracts, csv = write_interaction_dataset(work / "data")  # the source: a file outside the home
    s3_server.bucket(BUCKET)
    _database(postgres_server, "mlflow")
    _database(postgres_server, "prefect")
    bin_dir = Path(sys.executable).parent
    aws = s3_server.env()
    client_aws = {k: v for k, v in aws.items() if k != "MLFLOW_S3_ENDPOINT_URL"}  # MLflow clients go by proxy
    processes: list[subprocess.Popen] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
        log = work / f"{name}.log"
        with open(log, "ab") as out:
            process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=work,
                                       start_new_session=True)
        processes.append(process)
        return process, log

    prefect = None
    ray_address = None
    try:
        mlflow_port = free_port()
        mlflow, log = start("mlflow", [str(bin_dir / "mlflow"), "server", "--backend-store-uri",
                                       postgres_server.url(database="mlflow"), "--artifacts-destination",
                                       f"s3://{BUCKET}/mlflow", "--serve-artifacts", "--host", "127.0.0.1", "--port",
                                       str(mlflow_port), "--workers", "1"],
                            {**os.environ, **aws, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
        _wait_http(f"http://127.0.0.1:{mlflow_port}/health", mlflow, log, "mlflow server", 180)

        prefect = PrefectServer(work)
        prefect.env["PREFECT_API_DATABASE_CONNECTION_URL"] = postgres_server.url(database="prefect").replace(
            "postgresql+psycopg", "postgresql+asyncpg")
        prefect.start(timeout_s=180)

        evidently_port = free_port()
        evidently, log = start("evidently", [str(bin_dir / "evidently"), "ui", "--workspace", str(work / "evidently"),
                                             "--host", "127.0.0.1", "--port", str(evidently_port)], dict(os.environ))
        _wait_http(f"http://127.0.0.1:{evidently_port}/", evidently, log, "evidently ui", 120)

        dask_port = free_port()
        compute_env = {**os.environ, **client_aws, "PYTHONPATH": str(REPO)}
        start("dask-scheduler", [str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(dask_port),
                                 "--no-dashboard"], compute_env)
        start("dask-worker", [str(bin_dir / "dask"), "worker", f"tcp://127.0.0.1:{dask_port}", "--nthreads", "2",
                              "--host", "127.0.0.1", "--no-dashboard", "--memory-limit", "3GB"], compute_env)

        from compute import ray_cluster

        saved = {k: os.environ.get(k) for k in client_aws}
        os.environ.update(client_aws)  # the Ray nodes' environment
        try:
            ray_address = ray_cluster.start(nodes=2, cpus_per_node=1)
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

        home = work / "home"
        # A person's shell: not the RAY_* variables an earlier in-process Ray session of this
        # test process left in os.environ (RAY_AUTH_MODE=token among them, which the loopback
        # cluster, started with auth disabled, does not accept from a driver).
        shell = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env = {**shell, **client_aws, **{k: v for k, v in prefect.env.items() if k.startswith("PREFECT_")},
               "PREFECT_API_DATABASE_CONNECTION_URL": "",  # the server's, not the clients'
               "FLYWHEEL_PROFILE": "cluster", "FLYWHEEL_HOME": str(home),
               "FLYWHEEL_LAKE_ROOT": f"s3://{BUCKET}/lake", "FLYWHEEL_SHARED_ROOT": f"s3://{BUCKET}/shared",
               "FLYWHEEL_TRAIN__TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
               "FLYWHEEL_DASK__ADDRESS": f"tcp://127.0.0.1:{dask_port}", "FLYWHEEL_RAY__ADDRESS": ray_address,
               "FLYWHEEL_RAY__STORAGE_PATH": str(work / "ray-shared"),  # a shared file system on a real cluster
               "FLYWHEEL_MONITOR__EVIDENTLY_URL": f"http://127.0.0.1:{evidently_port}",
               "FLYWHEEL_MONITOR__MIN_ROWS": "100", "FLYWHEEL_MONITOR__MIN_FEEDBACK": "100",
               "FLYWHEEL_MONITOR__PUSHGATEWAY": "",  # the profile names one; this test has none
               "FLYWHEEL_DATASETS_DIR": str(contracts), "INTERACTION_CSV": str(csv), "PYTHONPATH": str(REPO),
               "FLYWHEEL_REPO": str(REPO)}  # where the deployments pull step finds the flows
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        yield {"env": env, "home": home, "work": work, "mlflow": f"http://127.0.0.1:{mlflow_port}",
               "prefect_api": prefect.api, "s3": s3_server, "postgres": postgres_server,
               "ray": ray_address}
    finally:
        if ray_address:
            ray_cluster.stop(ray_address)
        if prefect is not None:
            prefect.stop()
        for process in reversed(processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def _run(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def test_the_loop_runs_with_every_part_remote_and_leaves_nothing_local_but_caches(cluster, monkeypatch):
    env, home = cluster["env"], cluster["home"]
    outputs = []
    outputs.append(_run(env, "flows.ingest", "--dataset", "interaction"))
    outputs.append(_run(env, "flows.etl", "--dataset", "interaction"))
    space = {"lr": [0.02, 0.03], "width": [16], "depth": [1], "dropout": [0.0], "embedding_dim": [4],
             "batch_size": [64], "weight_decay": [1e-6, 1e-5]}
    train_env = {**env, "FLYWHEEL_TRAIN__SEARCH_SPACE": json.dumps(space)}
    # Every family competes, each trial a Ray Train group of two workers, one on each node: the
    # network as DDP and the trees as LightGBM's data-parallel learner; the linear model in one
    # process.
    trained = _run(train_env, "flows.train", "--dataset", "interaction", "--trials", "1", "--max-epochs", "3",
                   "--num-workers", "2")
    outputs.append(trained)
    said = trained.stdout + trained.stderr
    assert f"connecting to Ray cluster {cluster['ray']}" in said
    assert "Ray ready: 2.0 CPUs on 2 node(s)" in said and "each trial a Ray Train group of 2 workers" in said
    assert "(gbdt) iteration" in said and "(tabular_net) iteration" in said, said[-6000:]
    port = free_port()
    outputs.append(_run(env, "flows.deploy", "--action", "serve", "--dataset", "interaction", "--port", str(port)))
    try:
        url = f"http://127.0.0.1:{port}"
        rng = np.random.default_rng(1)
        ids = []
        for start in range(0, 300, 50):
            records = [{"at": "2024-06-01T10:00:00Z", "a": str(rng.choice(["x", "y"])),
                        "b": str(rng.choice(["u", "v"])), "noise": float(rng.normal())} for _ in range(50)]
            answer = requests.post(f"{url}/predict", json={"records": records, "routing_key": f"k{start}"},
                                   timeout=60)
            assert answer.status_code == 200, answer.text
            for sent, prediction in zip(records, answer.json()["predictions"], strict=True):
                ids.append((prediction["request_id"], float((sent["a"] == "x") ^ (sent["b"] == "u"))))
        answer = requests.post(f"{url}/feedback", json={"items": [{"request_id": r, "actual": a} for r, a in ids]},
                               timeout=60)
        assert answer.status_code == 200 and answer.json()["accepted"] == len(ids), answer.text
        time.sleep(3)  # the service's log book commits within a second or two
        outputs.append(_run(env, "flows.monitor", "--dataset", "interaction"))
        # The loop's deployments on the PostgreSQL-backed server, and one run of them through a
        # process worker, as the schedules and automations would start it.
        register_deployments(env, monkeypatch)
        worker_log = cluster["work"] / "worker.log"
        with open(worker_log, "ab") as out:
            worker = subprocess.Popen([str(Path(sys.executable).parent / "prefect"), "worker", "start", "--pool",
                                       "flywheel-local", "--name", "cluster-test"], cwd=REPO, env=env, stdout=out,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            started = subprocess.run([str(Path(sys.executable).parent / "prefect"), "deployment", "run",
                                      "monitor/monitor", "--param", 'params={"dataset": "interaction"}', "--watch",
                                      "--watch-timeout", "300"], cwd=REPO, env=env, capture_output=True, text=True,
                                     timeout=360)
            assert started.returncode == 0 and "Completed" in started.stdout, (
                started.stdout[-3000:] + started.stderr[-2000:] + worker_log.read_text()[-3000:])
            outputs.append(started)
        finally:
            os.killpg(worker.pid, 2)
            worker.wait(timeout=60)
    finally:
        outputs.append(_run(env, "flows.deploy", "--action", "stop", "--dataset", "interaction"))

    # Everything landed where the profile says.
    from core.lake import Lake

    for key, value in cluster["s3"].env().items():  # this test's own reads of the bucket
        monkeypatch.setenv(key, value)
    lake = Lake(f"s3://{BUCKET}/lake")
    tables = [lake.uri("raw", "interaction", "events"), lake.uri("features", "interaction"),
              lake.uri("serving", "interaction", "predictions"), lake.uri("serving", "interaction", "feedback")]
    for uri in tables:
        assert lake.exists(uri), uri
    assert len(lake.read_pandas(lake.uri("serving", "interaction", "feedback"))) == len(ids)

    from mlflow import MlflowClient

    # Both addresses: an in-process training earlier in the suite left its own registry URI set
    # globally, and MlflowClient(tracking_uri) alone reads the registry there (seen in CI).
    mlflow = MlflowClient(tracking_uri=cluster["mlflow"], registry_uri=cluster["mlflow"])
    version = mlflow.get_model_version_by_alias("flywheel-interaction", "champion")
    assert version.source.startswith(("models:/", "mlflow-artifacts:")), version.source  # proxied, not s3://
    import boto3

    s3 = cluster["s3"]
    client = boto3.client("s3", endpoint_url=s3.endpoint, aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region)
    keys = [o["Key"] for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])]
    assert any(k.startswith("mlflow/") for k in keys), "no MLflow artifact on S3"
    assert any(k.startswith("shared/reports/performance/") for k in keys), "no monitoring report on S3"

    runs = requests.post(f"{cluster['prefect_api']}/flow_runs/filter", json={"limit": 50}, timeout=30).json()
    assert len(runs) >= 7, [r["name"] for r in runs]
    deployed = {d["name"] for d in requests.post(f"{cluster['prefect_api']}/deployments/filter", json={},
                                                 timeout=30).json()}
    assert {"ingest-daily", "etl", "train", "monitor", "evaluate-hourly", "serve-registered", "stream"} <= deployed
    import sqlalchemy as sa

    engine = sa.create_engine(cluster["postgres"].url(database="prefect"))
    with engine.connect() as connection:  # the Prefect server kept them in PostgreSQL
        assert connection.execute(sa.text("select count(*) from flow_run")).scalar() >= 7
        assert connection.execute(sa.text("select count(*) from deployment")).scalar() >= 7
    engine.dispose()
    projects = requests.get(f"{env['FLYWHEEL_MONITOR__EVIDENTLY_URL']}/api/projects", timeout=30).json()
    assert any(p["name"] == "flywheel-interaction" for p in projects), projects

    # Nothing but caches and the local service's process files under FLYWHEEL_HOME.
    present = {p.name for p in home.iterdir()} if home.exists() else set()
    assert present <= ALLOWED_UNDER_HOME, f"written under FLYWHEEL_HOME: {sorted(present - ALLOWED_UNDER_HOME)}"

    # No credential anywhere a person or another program could read it.
    secrets = [s3.secret_key, s3.access_key, cluster["postgres"].password]
    texts = {f"output of {' '.join(o.args[1:4])}": o.stdout + o.stderr for o in outputs}
    texts["the worker's log"] = worker_log.read_text(errors="replace")
    for path in home.rglob("*"):
        if path.is_file():
            texts[str(path)] = path.read_bytes().decode(errors="replace")
    for uri in tables:
        texts[f"Delta history of {uri}"] = json.dumps(lake.table(uri).history(), default=str)
    for run in mlflow.search_runs(experiment_ids=[e.experiment_id for e in mlflow.search_experiments()]):
        texts[f"MLflow run {run.info.run_id}"] = json.dumps({"params": run.data.params, "tags": run.data.tags})
    texts["MLflow model version"] = json.dumps(dict(version.tags)) + version.source
    texts["Prefect artifacts"] = json.dumps(requests.post(f"{cluster['prefect_api']}/artifacts/filter",
                                                          json={"limit": 200}, timeout=30).json())
    texts["Prefect logs"] = json.dumps(requests.post(f"{cluster['prefect_api']}/logs/filter",
                                                     json={"limit": 200}, timeout=30).json())
    texts["Prefect flow run parameters"] = json.dumps([r["parameters"] for r in runs])
    for where, text in texts.items():
        for secret in secrets:
            assert secret not in text, f"a credential is in {where}"
