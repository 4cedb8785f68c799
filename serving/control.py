"""The service's local control (the deploy flow's library): start ``bentoml serve``
supervised, find it, ask it what it serves, reload it, drain and stop it.

Each served dataset has a state file ``<home>/serving/<model name>.json`` (mode 0600) holding
the process id, its command line, address, settings and the admin token the deploy flow uses
to ask it to reload. ``stop`` ends exactly that process (its id and command line must match),
never another process that happens to reuse the port.

A ready service is announced to Prometheus by a file-based service discovery target,
``<home>/prometheus/targets/<model name>-<port>.json`` (``[{"targets": ["127.0.0.1:3000"],
"labels": {"model": ..., "dataset": ...}}]``), replaced whole (Prometheus never reads half a
file) and removed when the service is stopped or found gone, so Prometheus scrapes every
service this home runs, and only those, each labelled with its model.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests

from core.errors import FlywheelError
from core.settings import REPO_ROOT, ServingSettings, Settings

SERVICE = "serving.service:Flywheel"
log = logging.getLogger(__name__)
ADMIN_TOKEN_ENV = "FLYWHEEL_SERVING_ADMIN_TOKEN"


class DeployError(FlywheelError):
    """The service could not be started, reached or stopped as asked."""


@dataclass
class Served:
    """What the state file records about a running service."""

    pid: int
    host: str
    port: int
    dataset: str
    model_name: str
    lake: str
    challenger_share: float
    shadow: bool
    routing_field: str | None
    started_at: float
    log_file: str
    # Only when the deploy flow generated it (else it is in the environment); never printed.
    token: str | None = field(default=None, repr=False)
    # Its Prometheus target file (``target_file``); None in a record written before targets.
    target: str | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def admin_token(self) -> str:
        return os.environ.get(ADMIN_TOKEN_ENV) or self.token or ""


def state_file(settings: Settings, model_name: str) -> Path:
    return settings.home / "serving" / f"{model_name}.json"


def targets_dir(home: Path) -> Path:
    """The folder Prometheus' file-based service discovery reads (``<home>/prometheus/targets``)."""
    return home / "prometheus" / "targets"


def target_file(settings: Settings, model_name: str, port: int) -> Path:
    return targets_dir(settings.home) / f"{model_name}-{port}.json"


def write_target(served: Served) -> Path | None:
    """Announce the service to Prometheus: its target file, written to a temporary name and
    renamed over the old one (Prometheus reads ``*.json`` only, never a half-written file)."""
    if served.target is None:
        return None
    path = Path(served.target)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A service bound to every interface is scraped on loopback, like every local part.
    host = "127.0.0.1" if served.host in ("", "0.0.0.0", "::") else served.host
    labels = {"model": served.model_name, "dataset": served.dataset}
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([{"targets": [f"{host}:{served.port}"], "labels": labels}], indent=1) + "\n")
    os.replace(tmp, path)
    return path


def remove_target(served: Served) -> None:
    """Prometheus stops scraping the service (its target file is gone)."""
    if served.target is not None:
        Path(served.target).unlink(missing_ok=True)


def read_state(settings: Settings, model_name: str) -> Served | None:
    path = state_file(settings, model_name)
    if not path.exists():
        return None
    return Served(**json.loads(path.read_text()))


def _write_state(path: Path, served: Served) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(served), handle)
    tmp.replace(path)


def is_ours(served: Served) -> bool:
    """The recorded process is alive and is our service (not a reused process id)."""
    try:
        cmdline = Path(f"/proc/{served.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        try:
            os.kill(served.pid, 0)
        except OSError:
            return False
        return True  # no /proc (macOS): the id is alive; trust the state file
    return SERVICE in cmdline


def port_for(settings: Settings, model_name: str, preferred: int, tries: int = 20) -> int:
    """``preferred``, or the next port up when another model's service of this home holds it
    (one service per model: ``make up`` serves flights on 3000, the demo's model then gets
    3001). A port held by anything else is left for ``start`` to report."""
    others = {served.port for path in (settings.home / "serving").glob("*.json")
              if path.stem != model_name and (served := read_state(settings, path.stem)) is not None
              and is_ours(served)}
    port = preferred
    while port in others and port < preferred + tries:
        port += 1
    return port


def probe(served: Served, path: str = "/readyz", timeout: float = 2.0) -> int | None:
    try:
        return requests.get(served.url + path, timeout=timeout).status_code
    except requests.RequestException:
        return None


def admin(served: Served, method: str, path: str, timeout: float = 120.0) -> dict[str, Any]:
    token = served.admin_token()
    response = requests.request(method, f"{served.url}/admin{path}", timeout=timeout,
                                headers={"Authorization": f"Bearer {token}"})
    if response.status_code >= 400:
        raise DeployError(f"{method} /admin{path} answered {response.status_code}: {response.text[:300]}")
    return response.json()


def _status(served: Served) -> dict[str, Any]:
    """GET /admin/models, or {} while the service does not answer it."""
    try:
        return admin(served, "GET", "/models", timeout=5)
    except (DeployError, requests.RequestException):
        return {}


def start(settings: Settings, dataset: str, model_name: str, lake: str, host: str, port: int,
          challenger_share: float, shadow: bool, routing_field: str | None, wait_s: float) -> Served:
    """Start ``bentoml serve`` in its own session and wait until it is ready."""
    path = state_file(settings, model_name)
    folder = path.parent
    folder.mkdir(parents=True, exist_ok=True)
    log_file = folder / f"{model_name}.log"
    token = None if os.environ.get(ADMIN_TOKEN_ENV) else secrets.token_urlsafe(32)
    env = dict(os.environ,
               FLYWHEEL_HOME=str(settings.home), FLYWHEEL_LAKE_ROOT=lake,
               FLYWHEEL_SERVING__DATASET=dataset, FLYWHEEL_SERVING__MODEL_NAME=model_name,
               FLYWHEEL_SERVING__HOST=host, FLYWHEEL_SERVING__PORT=str(port),
               FLYWHEEL_SERVING__CHALLENGER_SHARE=str(challenger_share),
               FLYWHEEL_SERVING__SHADOW=str(shadow).lower(),
               FLYWHEEL_SERVING__DRAIN_S=str(settings.serving.drain_s),
               # One BentoML home per server: its Prometheus multiprocess folder is not shared.
               BENTOML_HOME=str(settings.home / "bentoml" / f"{model_name}-{port}"),
               BENTOML_DO_NOT_TRACK="true", PYTHONPATH=str(REPO_ROOT))
    env["FLYWHEEL_DATASETS_DIR"] = str(settings.datasets_dir)
    env["FLYWHEEL_TRAIN__TRACKING_URI"] = settings.tracking_uri
    if routing_field:
        env["FLYWHEEL_SERVING__ROUTING_FIELD"] = routing_field
    if token:
        env[ADMIN_TOKEN_ENV] = token
    command = [str(Path(sys.executable).parent / "bentoml"), "serve", SERVICE, "--host", host, "--port", str(port),
               "--working-dir", str(REPO_ROOT)]
    with open(log_file, "ab") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    served = Served(process.pid, host, port, dataset, model_name, lake, challenger_share, shadow, routing_field,
                    time.time(), str(log_file), token, str(target_file(settings, model_name, port)))
    _write_state(path, served)
    deadline = time.monotonic() + wait_s
    asked = 0.0
    while time.monotonic() < deadline:
        if process.poll() is not None:
            path.unlink(missing_ok=True)
            raise DeployError(f"the service exited with code {process.returncode} before it was ready; "
                              f"last lines of {log_file}:\n{_tail(log_file)}")
        if probe(served) == 200:
            write_target(served)  # ready: Prometheus scrapes it from now on
            return served
        if time.monotonic() - asked > 2:  # up, not ready: a failure waiting cannot fix ends the wait
            asked = time.monotonic()
            status = _status(served)
            if status.get("problem") and status.get("problem_heals") is False:
                stop(served, path)
                raise DeployError(f"the service cannot load its models, and waiting will not fix it: "
                                  f"{status['problem']}")
        time.sleep(0.5)
    problem = _status(served).get("problem") or ""
    stop(served, path)
    raise DeployError(f"the service was not ready after {wait_s:.0f} s ({problem or 'no reason given'}); "
                      f"last lines of {log_file}:\n{_tail(log_file)}")


def stop(served: Served, path: Path, drain_s: float = 0.0, timeout_s: float = 60.0) -> bool:
    """Drain, then stop the service (see serving.drain): SIGUSR1 to each worker starts the drain,
    which after ``drain_s`` stops taking connections; then SIGTERM to the process group answers
    every request taken and flushes the prediction log; SIGKILL after ``timeout_s``. Removes
    the state file and the Prometheus target, also when the service was already gone. False
    if it was not running."""
    running = is_ours(served)
    if running and _signal_workers(served.pid, signal.SIGUSR1):
        time.sleep(drain_s + 0.25)  # the workers stop listening at drain_s
    if running:
        try:
            os.killpg(served.pid, signal.SIGTERM)
        except ProcessLookupError:
            running = False
    if running:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and _alive(served.pid):
            time.sleep(0.2)
        if _alive(served.pid):
            os.killpg(served.pid, signal.SIGKILL)
    remove_target(served)
    path.unlink(missing_ok=True)
    return running


def _signal_workers(pid: int, signum: int) -> int:
    """Send ``signum`` to the service's BentoML workers (not to its arbiter, which a SIGUSR1
    would end); the number signalled."""
    import psutil

    sent = 0
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return 0
    for child in children:
        try:
            if "_bentoml_impl.worker" in " ".join(child.cmdline()):
                child.send_signal(signum)
                sent += 1
        except psutil.Error:  # gone meanwhile
            continue
    return sent


def _alive(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)  # our child: reap it
        if finished == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def running(settings: Settings, model_name: str) -> Served | None:
    """The service recorded for ``model_name`` if it still runs; a record of one that is gone
    (killed, the machine restarted) is removed with its Prometheus target, with a warning."""
    served = read_state(settings, model_name)
    if served is not None and not is_ours(served):
        log.warning("the service recorded for %s (process %d) is gone; forgetting it", model_name, served.pid)
        remove_target(served)
        state_file(settings, model_name).unlink(missing_ok=True)
        return None
    return served


@dataclass(frozen=True)
class ServeOptions:
    """Where a service listens and how it splits traffic."""

    host: str
    port: int
    challenger_share: float
    shadow: bool
    routing_field: str | None


SERVE_OPTIONS = ("host", "port", "challenger_share", "shadow", "routing_field")


def serve_plan(config: ServingSettings, asked: dict[str, Any], served: Served | None) -> tuple[str, ServeOptions]:
    """What ``serve`` does, and with which options. ``asked``: the options the call names (None
    for those it leaves out).

    - "start": nothing runs; the options asked, else the settings'.
    - "reload": a service runs with every option asked: it keeps running and reloads its models
      (the deploy run a registration triggers names none, so the traffic split stays).
    - "restart": a service runs with other options: it is stopped and started with the options
      asked over its own.
    """
    wanted = {k: v for k, v in asked.items() if k in SERVE_OPTIONS and v is not None}
    if served is None:
        base = {k: getattr(config, k) for k in SERVE_OPTIONS}
        return "start", ServeOptions(**{**base, **wanted})
    own = ServeOptions(**{k: getattr(served, k) for k in SERVE_OPTIONS})
    if all(getattr(own, k) == v for k, v in wanted.items()):
        return "reload", own
    return "restart", ServeOptions(**{**asdict(own), **wanted})


def service_status(served: Served | None) -> dict[str, Any] | None:
    """What the service reports it serves (GET /admin/models); None when there is none, or it
    does not answer (best effort, with a warning)."""
    if served is None:
        return None
    try:
        return admin(served, "GET", "/models", timeout=10)
    except Exception as exc:  # noqa: BLE001 - status is best effort
        log.warning("could not read the service's status: %s", exc)
        return None


def reload_service(served: Served) -> dict[str, Any]:
    """Ask the running service to load the registry's aliases now; returns what it serves."""
    return admin(served, "POST", "/reload")
