"""The two images for real: ``deployments/docker/build.sh`` builds flywheel-runner and flywheel-serving, a
Prefect ``docker`` work pool runs the ``train`` deployment of deployments/prefect.yaml in the
runner image, and the serving image serves the model that run registered.

Docker: the engine DOCKER_HOST (or the default socket) names when one answers; else a private
dockerd (``deployments/docker/dockerd.sh``, needs root and Debian's docker.io) whose data root,
``FLYWHEEL_DOCKER_ROOT`` (default ``~/.cache/flywheel/docker``), keeps the images between runs;
the test stops that daemon at the end. Images are tagged ``FLYWHEEL_IMAGE_TAG`` (default dev)
and reused when their build hash matches the checkout (``deployments/docker/build.sh``): the first build
takes minutes, a rerun seconds. Without the tools the tests skip on a developer machine and
fail under CI (``need_service``).

The two tests share one training run to keep the time down: the run of the docker work pool
(test 1) registers the model the serving container loads (test 2). Containers use the host's
network (the private daemon has no bridge) and see the test's folder at the same path.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import REPO, PrefectServer, free_port, need_service, write_interaction_dataset

# The first build (base image, two environments) takes minutes and counts in the first test.
pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(2400)]

DOCKER_ROOT = Path(os.environ.get("FLYWHEEL_DOCKER_ROOT", Path.home() / ".cache" / "flywheel" / "docker"))
TAG = os.environ.get("FLYWHEEL_IMAGE_TAG", "dev")
DATASET = "interaction"
MODEL = f"flywheel-{DATASET}"
# Small and quick, as in tests/test_deployments.py.
TRAIN = {"trials": 1, "max_epochs": 2, "grace_period": 1, "num_workers": 1}


def _docker_cli() -> str | None:
    return shutil.which("docker")


def _answers(docker: str, env: dict[str, str]) -> bool:
    try:
        return subprocess.run([docker, "version", "--format", "{{.Server.Version}}"], env=env,
                              capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@dataclass(frozen=True)
class Docker:
    cli: str
    env: dict[str, str]  # os.environ plus DOCKER_HOST

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([self.cli, *args], env=self.env, capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"docker {' '.join(args)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


@pytest.fixture(scope="module")
def docker():
    """A Docker engine: the one the environment names, else a private dockerd started here
    (stopped afterwards; its data root and images stay)."""
    cli = _docker_cli()
    if cli and _answers(cli, dict(os.environ)):
        yield Docker(cli, dict(os.environ))
        return
    if cli is None or shutil.which("dockerd") is None:
        need_service("no Docker engine answers and docker.io is not installed to start one "
                     "(apt-get install -y docker.io debootstrap)")
    if os.geteuid() != 0:
        need_service("no Docker engine answers, and a private dockerd needs root")
    script = str(REPO / "deployments" / "docker" / "dockerd.sh")
    # One already running on this data root (a developer's) is used and left running.
    ours = subprocess.run([script, "status", str(DOCKER_ROOT)], capture_output=True, timeout=60).returncode != 0
    started = time.monotonic()
    done = subprocess.run([script, "start", str(DOCKER_ROOT)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    host = next(line.split("=", 1)[1] for line in done.stdout.splitlines() if line.startswith("export DOCKER_HOST="))
    print(f"private dockerd up in {time.monotonic() - started:.1f} s ({done.stderr.strip()})")
    try:
        yield Docker(cli, {**os.environ, "DOCKER_HOST": host})
    finally:
        if ours:
            subprocess.run([script, "stop", str(DOCKER_ROOT)], capture_output=True, timeout=120)


@dataclass(frozen=True)
class Images:
    runner: str
    serving: str


@pytest.fixture(scope="module")
def images(docker: Docker, tmp_path_factory) -> Images:
    """deployments/docker/build.sh, which keeps images whose build hash matches (a rerun takes seconds).
    pip inside the build trusts FLYWHEEL_EXTRA_CA, or else the CA bundle this machine's pip is
    told to use (PIP_CERT), as a build secret."""
    env = {**docker.env, "FLYWHEEL_IMAGE_TAG": TAG}
    extra_ca = os.environ.get("FLYWHEEL_EXTRA_CA") or os.environ.get("PIP_CERT")
    if extra_ca and Path(extra_ca).is_file():
        env["FLYWHEEL_EXTRA_CA"] = extra_ca
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        done = subprocess.run([str(REPO / "deployments" / "docker" / "build.sh")], cwd=REPO, env=env, stdout=out,
                              stderr=subprocess.STDOUT, timeout=3600)
    text = log.read_text(errors="replace")
    if done.returncode == 3:  # build.sh: a tool it needs is missing
        need_service(text.strip().splitlines()[-1])
    assert done.returncode == 0, text[-5000:]
    print(f"deployments/docker/build.sh: {time.monotonic() - started:.1f} s")
    return Images(f"flywheel-runner:{TAG}", f"flywheel-serving:{TAG}")


@dataclass
class TrainRun:
    work: Path
    home: Path
    contracts: Path
    csv: Path
    state: object  # the flow run's final state (None if it never finished)
    flow_run_id: str
    container_images: list[str]
    pull_steps: list
    worker_log: str


def _docker_prefect_file(work: Path, runner_image: str, env: dict[str, str]) -> Path:
    """deployments/prefect.yaml's `train` deployment as it is, on a `docker` work pool whose
    job runs the runner image on the host's network with the test's folder mounted."""
    config = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    train = next(d for d in config["deployments"] if d["name"] == "train")
    train["work_pool"] = {
        "name": "flywheel-docker", "work_queue_name": "default",
        "job_variables": {"image": runner_image, "image_pull_policy": "Never", "network_mode": "host",
                          "volumes": [f"{work}:{work}"], "env": env, "auto_remove": False,
                          "stream_output": True, "container_create_kwargs": {"shm_size": "1g"}}}
    config["deployments"] = [train]
    config.pop("definitions", None)
    path = work / "prefect-docker.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def train_run(docker: Docker, images: Images, tmp_path_factory) -> TrainRun:
    """A Prefect server on 127.0.0.1, a `docker` work pool with the train deployment, and a
    `prefect worker --type docker`; one train run on the interaction dataset, waited for."""
    if shutil.which("prefect", path=str(Path(sys.executable).parent)) is None:
        pytest.fail("prefect is not installed in this environment")
    try:
        import prefect_docker  # noqa: F401
    except ImportError:
        need_service("prefect-docker is not installed (pip install prefect-docker)")
    work = tmp_path_factory.mktemp("containers")
    contracts, csv = write_interaction_dataset(work / "data")
    home = work / "home"
    home.mkdir()
    # The runner's user (1000) writes the home; the folders are this process's, so it may open them.
    for folder in (work, home, work / "data"):
        folder.chmod(0o777)
    run_env = {"FLYWHEEL_HOME": str(home), "FLYWHEEL_DATASETS_DIR": str(contracts), "INTERACTION_CSV": str(csv),
               "FLYWHEEL_TRAIN": json.dumps(TRAIN),
               # The worker passes its own Prefect settings on, PREFECT_HOME included (this
               # test's folder, which the container's user may not write): the image's default.
               "PREFECT_HOME": "/home/flywheel/.prefect"}
    prefect_file = _docker_prefect_file(work, images.runner, run_env)

    server = PrefectServer(work)
    prefect = str(Path(sys.executable).parent / "prefect")
    # The pull step's {{ $FLYWHEEL_REPO }} is resolved now: the checkout inside the runner image.
    deploy_env = {**server.env, "FLYWHEEL_REPO": "/opt/flywheel"}
    worker = None
    worker_log = work / "worker.log"
    flow_run_id = ""
    state = None
    try:
        server.start()
        for command in ([prefect, "work-pool", "create", "flywheel-docker", "--type", "docker"],
                        [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", str(prefect_file)]):
            done = subprocess.run(command, cwd=REPO, env=deploy_env, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        with open(worker_log, "wb") as out:
            worker = subprocess.Popen([prefect, "worker", "start", "--pool", "flywheel-docker", "--type", "docker",
                                       "--name", "containers-test"], cwd=REPO,
                                      env={**server.env, **{k: v for k, v in docker.env.items() if k == "DOCKER_HOST"},
                                           "PREFECT_WORKER_QUERY_SECONDS": "2",
                                           # docker-py's 60 s is too short for vfs, which copies
                                           # the whole image when it creates a container.
                                           "DOCKER_CLIENT_TIMEOUT": "600"},
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        from prefect.client.orchestration import get_client
        from prefect.deployments import run_deployment
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def read(run_id):
            async with get_client() as client:
                return await client.read_flow_run(run_id)

        async def pull_steps():
            async with get_client() as client:
                return (await client.read_deployment_by_name("train/train")).pull_steps

        started = time.monotonic()
        with temporary_settings({PREFECT_API_URL: server.api}):
            run = run_deployment("train/train", parameters={"params": {"dataset": DATASET, "refresh_data": True}},
                                 timeout=0)
            flow_run_id = str(run.id)
            steps = asyncio.run(pull_steps())
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                run = asyncio.run(read(run.id))
                if run.state is not None and run.state.is_final():
                    state = run.state
                    break
                assert worker.poll() is None, worker_log.read_text()[-4000:]
                time.sleep(2)
        print(f"train run on the docker pool: {time.monotonic() - started:.1f} s, {state}")
        listed = docker.run("ps", "-a", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}",
                            "--format", "{{.Image}}", check=False)
        container_images = listed.stdout.split()
        if state is None or not state.is_completed():
            for name in docker.run("ps", "-aq", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}",
                                   check=False).stdout.split():
                logs = docker.run("logs", "--tail", "80", name, check=False)
                print(logs.stdout[-4000:], logs.stderr[-4000:])
        # The run's files belong to the runner's user (1000). The service (1034) writes its
        # prediction log into the same lake, and this process must be able to delete them:
        # opened up by a root container, as a host user may not chown them.
        docker.run("run", "--rm", "--network", "none", "--user", "0", "-v", f"{work}:{work}", images.runner,
                   "chmod", "-R", "a+rwX", str(home), timeout=600)
        yield TrainRun(work, home, contracts, csv, state, flow_run_id, container_images, steps,
                       worker_log.read_text(errors="replace"))
    finally:
        if worker is not None and worker.poll() is None:
            os.killpg(worker.pid, signal.SIGINT)  # a worker may ignore SIGTERM for a while
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait(timeout=30)
        if flow_run_id:
            for name in docker.run("ps", "-aq", "--filter", f"label=io.prefect.flow-run-id={flow_run_id}",
                                   check=False).stdout.split():
                docker.run("rm", "-f", name, check=False)
        server.stop()


def test_a_docker_work_pool_runs_the_train_deployment_in_the_runner_image(train_run: TrainRun, images: Images):
    from core.registry import Registry

    assert train_run.state is not None, "the train run did not finish in 10 minutes:\n" + train_run.worker_log[-4000:]
    assert train_run.state.is_completed(), f"{train_run.state}\n{train_run.worker_log[-4000:]}"
    # It ran in a container of the runner image (the worker leaves it for the test to remove).
    assert train_run.container_images == [images.runner], train_run.container_images
    registry = Registry.for_uri(f"sqlite:///{train_run.home / 'mlflow.db'}")
    assert registry.aliases(MODEL).get("champion") == "1"
    # The flow ran from the image's checkout (the pull step), not from this one.
    assert train_run.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/flywheel"}}]
    assert "Deployment step 'set_working_directory' completed successfully" in train_run.worker_log


def _metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus text exposition's samples of `name` with these labels."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_serving_image_serves_the_registered_model_and_counts_requests(train_run: TrainRun, images: Images,
                                                                            docker: Docker):
    assert train_run.state is not None and train_run.state.is_completed(), "no model: the train run failed"
    user = docker.run("image", "inspect", "--format", "{{.Config.User}}", images.serving).stdout.strip()
    assert user == "1034:1034"
    port = free_port()
    name = f"flywheel-serving-test-{port}"
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    docker.run("run", "-d", "--name", name, "--network", "host", "-v", f"{train_run.work}:{train_run.work}",
               "-e", f"FLYWHEEL_HOME={train_run.home}", "-e", f"FLYWHEEL_DATASETS_DIR={train_run.contracts}",
               "-e", f"INTERACTION_CSV={train_run.csv}", "-e", f"FLYWHEEL_SERVING__DATASET={DATASET}",
               # Host networking: keep it on loopback (the image's default is 0.0.0.0:3000).
               "-e", "FLYWHEEL_SERVING__HOST=127.0.0.1", "-e", f"FLYWHEEL_SERVING__PORT={port}",
               images.serving, timeout=600)
    try:
        deadline = time.monotonic() + 180
        ready = None
        while time.monotonic() < deadline:
            running = docker.run("inspect", "--format", "{{.State.Running}}", name).stdout.strip()
            assert running == "true", docker.run("logs", "--tail", "60", name, check=False).stderr[-4000:]
            try:
                ready = requests.get(f"{url}/readyz", timeout=3).status_code
            except requests.RequestException:
                ready = None
            if ready == 200:
                break
            time.sleep(1)
        logs = docker.run("logs", "--tail", "60", name, check=False)
        assert ready == 200, f"not ready: {ready}\n{logs.stdout[-2000:]}\n{logs.stderr[-4000:]}"
        print(f"serving container ready in {time.monotonic() - started:.1f} s")
        assert docker.run("exec", name, "id", "-u").stdout.strip() == "1034"

        records = [{"at": "2024-06-01T10:00:00Z", "a": a, "b": b, "noise": 0.0}
                   for a, b in (("x", "u"), ("x", "v"), ("y", "u"))]
        for _ in range(2):
            response = requests.post(f"{url}/predict", json={"records": records}, timeout=30)
            assert response.status_code == 200, response.text
            predictions = response.json()["predictions"]
            assert len(predictions) == 3
            assert all(0.0 <= p["score"] <= 1.0 for p in predictions), predictions
            assert {(p["model_name"], p["model_version"], p["variant"]) for p in predictions} == {
                (MODEL, "1", "champion")}
        metrics = requests.get(f"{url}/metrics", timeout=10)
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain"), metrics.headers
        text = metrics.text
        assert _metric(text, "bentoml_service_request_total", endpoint="/predict", http_response_code="200") >= 2, (
            [line for line in text.splitlines() if line.startswith("bentoml_service_request_total")])
        assert _metric(text, "flywheel_predictions_total") >= 6
    finally:
        docker.run("stop", "-t", "30", name, check=False, timeout=60)
        docker.run("rm", "-f", name, check=False)
