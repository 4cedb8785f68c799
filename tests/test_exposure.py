"""What a run exposes: every listener it starts is on loopback, and no secret it was given
appears in any log or store. One end-to-end run (HTTP and PostgreSQL sources with credentials,
ingest, Dask ETL, Ray training, MLflow registry) is watched and then searched."""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import numpy as np
import pandas as pd
import pytest

from tests.conftest import write_contract

pytestmark = pytest.mark.slow

LOOPBACK = ("127.", "::1", "::ffff:127.")


class ListenerWatch(threading.Thread):
    """Samples the listening sockets of this process and all its descendants (Ray's GCS,
    raylet, workers and agents are children of the driver)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.seen: set[tuple[str, int, str]] = set()
        self.stop = threading.Event()

    def sample(self) -> None:
        import psutil

        me = psutil.Process()
        family = {me.pid, *(p.pid for p in me.children(recursive=True))}
        for conn in psutil.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN and conn.pid in family:
                try:
                    name = psutil.Process(conn.pid).name()
                except psutil.Error:
                    name = "?"
                self.seen.add((conn.laddr.ip, conn.laddr.port, name))

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a process that ended mid-sample
                pass
            time.sleep(0.2)

    def exposed(self) -> list[tuple[str, int, str]]:
        return sorted(s for s in self.seen if not s[0].startswith(LOOPBACK))


def serve_events(frame: pd.DataFrame, api_key: str, token: str) -> ThreadingHTTPServer:
    """A paged JSON API on 127.0.0.1 that wants the key in the query and a bearer token."""
    records = json.loads(frame.to_json(orient="records", date_format="iso"))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            query = parse_qs(urlsplit(self.path).query)
            if query.get("api_key") != [api_key] or self.headers.get("Authorization") != f"Bearer {token}":
                self.send_response(401)
                self.end_headers()
                return
            page = int(query.get("page", ["1"])[0])
            body = {"data": records[(page - 1) * 1000: page * 1000]}
            payload = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args) -> None:  # keep the test output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture
def exposure_dataset(tmp_path, monkeypatch, postgres_server):
    """The interaction task with its events behind an authenticated HTTP API and a lookup
    table in PostgreSQL whose password travels as a URL query parameter."""
    import sqlalchemy as sa

    secrets = {"api_key": f"key-{uuid.uuid4().hex}", "token": f"tok-{uuid.uuid4().hex}",
               "pg_password": postgres_server.password}
    rng = np.random.default_rng(0)
    n = 2000
    a, b = rng.choice(["x", "y"], n), rng.choice(["u", "v"], n)
    label = ((a == "x") ^ (b == "u")).astype(float)
    events = pd.DataFrame({"row_id": np.arange(1, n + 1),
                           "at": pd.date_range("2024-01-01", periods=n, freq="h").astype(str),
                           "a": a, "b": b, "noise": rng.normal(size=n).round(6), "outcome": label})
    server = serve_events(events, secrets["api_key"], secrets["token"])
    engine = sa.create_engine(postgres_server.url())
    table = f"segments_{uuid.uuid4().hex[:8]}"
    with engine.begin() as conn:
        pd.DataFrame({"b": ["u", "v"], "weight": [0.3, 0.7]}).to_sql(table, conn, index=False)
    engine.dispose()
    monkeypatch.setenv("FLYWHEEL_TEST_API_KEY", secrets["api_key"])
    monkeypatch.setenv("FLYWHEEL_TEST_TOKEN", secrets["token"])
    monkeypatch.setenv("FLYWHEEL_TEST_PGPW", secrets["pg_password"])
    port = server.server_address[1]
    folder = tmp_path / "datasets"
    write_contract(folder, "exposure", f"""\
        name: exposure
        base_table: events
        tables:
          events:
            source:
              kind: http
              url: "http://127.0.0.1:{port}/events?api_key=${{FLYWHEEL_TEST_API_KEY}}"
              headers: {{Authorization: "Bearer ${{FLYWHEEL_TEST_TOKEN}}"}}
              page_param: page
              retries: 1
              backoff_s: 0.1
            primary_key: [row_id]
            columns:
              row_id: {{type: int}}
              at: {{type: datetime, timezone: UTC}}
              a: {{type: str, allowed: [x, y]}}
              b: {{type: str, allowed: [u, v]}}
              noise: {{type: float}}
              outcome: {{type: float, min: 0, max: 1}}
          segments:
            source:
              kind: sql
              url: "postgresql+psycopg://{postgres_server.user}@{postgres_server.host}:{postgres_server.port}/postgres?password=${{FLYWHEEL_TEST_PGPW}}"
              query: "select b, weight from {table}"
            primary_key: [b]
            columns:
              b: {{type: str}}
              weight: {{type: float, min: 0, max: 1}}
        joins:
          - {{table: segments, join_on: [b], columns: [weight]}}
        target: {{column: outcome, kind: binary, threshold: 0.5, name: positive}}
        features: {{categorical: [a, b], numeric: [noise, weight]}}
        time_column: at
        split: {{train_fraction: 0.6, validation_fraction: 0.2}}
        """)
    yield folder, secrets
    server.shutdown()


def _files_holding(root: Path, needles: list[str]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            try:
                data = path.read_bytes()
            except OSError:
                continue
            found += [f"{path} holds {n[:6]}…" for n in needles if n.encode() in data]
    return found


def _prefect_logs(flow_run_ids: list[str]) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read() -> str:
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_run_ids)))
            return "\n".join(log.message for log in logs)

    return asyncio.run(read())


def test_a_run_listens_on_loopback_only_and_leaks_no_secret(home, prefect_harness, exposure_dataset,
                                                             capfd, caplog, monkeypatch):
    import prefect.settings

    from core.settings import configure
    from core.sources import SourceError
    from flows.ingest import IngestParams, ingest
    from flows.train import TrainParams, train

    folder, secrets = exposure_dataset
    configure(home=str(home.home), datasets_dir=str(folder), train={
        "trials": 1, "max_epochs": 2, "grace_period": 1, "num_workers": 1,
        "search_space": {"lr": [0.02, 0.03], "width": [16], "depth": [1], "dropout": [0.0],
                         "embedding_dim": [4], "batch_size": [64], "weight_decay": [1e-6, 1e-5]}})
    watch = ListenerWatch()
    watch.start()
    try:
        # Ingest (HTTP + SQL), the Dask ETL, Ray Tune/Train and the MLflow registry, all of it.
        result = train(TrainParams(dataset="exposure", should_register=True))
        assert result.feature_version == 0 and result.mlflow_run_id
        # A second run: ingestion again, nothing new, features reused.
        ingest(IngestParams(dataset="exposure"))
    finally:
        watch.stop.set()
        watch.join()
    assert watch.exposed() == [], f"listeners on a non-loopback address: {watch.exposed()}"
    names = {name for _, _, name in watch.seen}
    assert any(n in names for n in ("gcs_server", "raylet")), f"the watch never saw Ray's processes: {names}"

    # Failures: a wrong password and a wrong token; each fails once, clearly, never retried.
    wrong = {"pg": f"wrong-{uuid.uuid4().hex}", "token": f"wrong-{uuid.uuid4().hex}"}
    monkeypatch.setenv("FLYWHEEL_TEST_PGPW", wrong["pg"])
    wrong_password = ingest(IngestParams(dataset="exposure", tables=["segments"]), return_state=True)
    with pytest.raises(SourceError, match="authentication failed") as info:
        wrong_password.result()
    assert "password=***" in str(info.value)
    monkeypatch.setenv("FLYWHEEL_TEST_PGPW", secrets["pg_password"])
    monkeypatch.setenv("FLYWHEEL_TEST_TOKEN", wrong["token"])
    wrong_token = ingest(IngestParams(dataset="exposure", tables=["events"]), return_state=True)
    with pytest.raises(SourceError, match="HTTP 401") as info:
        wrong_token.result()
    assert "api_key=***" in str(info.value)
    failed_flows = [str(s.state_details.flow_run_id) for s in (wrong_password, wrong_token)]
    deadline = time.monotonic() + 30  # task runs reach the API as events, just after the flow
    while True:
        failed = [r for r in _task_runs(failed_flows) if r["state"] == "FAILED"]
        if len(failed) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert sorted(r["name"].rsplit("-", 1)[0] for r in failed) == ["read events", "read segments"], failed
    assert all(r["run_count"] == 1 for r in failed), failed  # an auth failure is not retried

    needles = [secrets["api_key"], secrets["token"], secrets["pg_password"], wrong["pg"], wrong["token"]]
    out, err = capfd.readouterr()
    leaks = [f"terminal holds {n[:6]}…" for n in needles if n in out + err]
    leaks += [f"log record holds {n[:6]}…" for n in needles
              if any(n in r.getMessage() for r in caplog.records)]
    # Every store: the lake (data and commit metadata), MLflow's database and artifacts,
    # Prefect's result storage, Great Expectations' files, Ray's results; Prefect's database
    # (logs, artifacts, parameters, states); Ray's session logs.
    leaks += _files_holding(home.home, needles)
    database = Path(prefect.settings.PREFECT_SERVER_DATABASE_CONNECTION_URL.value().split("///", 1)[1])
    leaks += _files_holding(database.parent, needles)
    ray_logs = Path("/tmp/ray/session_latest/logs")
    if ray_logs.exists():
        leaks += _files_holding(ray_logs, needles)
    prefect_logs = _prefect_logs(failed_flows)
    leaks += [f"Prefect logs hold {n[:6]}…" for n in needles if n in prefect_logs]
    assert leaks == []
    assert "***" in prefect_logs or "***" in out + err  # the masked form is what people see


def _task_runs(flow_run_ids: list[str]) -> list[dict]:
    """The task runs of the given flow runs."""
    import asyncio
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read() -> list[dict]:
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[UUID(i) for i in flow_run_ids])))
            return [{"name": r.name, "state": r.state_type.value if r.state_type else None,
                     "run_count": r.run_count, "flow_run_id": str(r.flow_run_id)} for r in runs]

    return asyncio.run(read())
