"""The local stack behind ``make up`` / ``make down``: a real Prefect server (UI), a process
worker with the deployments of ``deployments/prefect.yaml``, the MLflow UI, the Evidently UI,
Prometheus with its Pushgateway and Alertmanager, and the serving service.

Every process listens on 127.0.0.1 and runs under ``supervisord`` (the ``supervisor``
package), started in its own session (Ctrl-C in the terminal that ran ``make up`` reaches none
of them) with a configuration written to ``<home>/stack/supervisord.conf``: a part that dies is
restarted, ``status`` shows each part as supervisord sees it, and its control socket is a
unix socket under the stack's folder (no TCP port, mode 0700). ``<home>/stack/stack.json``
records the parts and supervisord's process; ``down`` stops the services the stack's deploy
runs started (``<home>/serving/*.json``), then every part in reverse order of start, then
supervisord.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from core.errors import FlywheelError
from core.settings import Settings
from flows._runtime import STACK_STATE

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORK_POOL = "flywheel-local"


class StackError(FlywheelError):
    """The stack could not be started or stopped as asked."""


@dataclass
class Ports:
    """Where each part listens on 127.0.0.1 (the README's defaults)."""

    service: int = 3000
    prefect: int = 4200
    mlflow: int = 5000
    evidently: int = 8000
    prometheus: int = 9090
    pushgateway: int = 9091
    alertmanager: int = 9093
    alertmanager_cluster: int = 9094
    redis: int = 6379

    @classmethod
    def free(cls) -> Ports:
        """Ports nothing listens on now (tests, and a second stack beside a running one)."""
        sockets = []
        for _ in range(len(cls.__dataclass_fields__)):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        ports = [s.getsockname()[1] for s in sockets]
        for sock in sockets:
            sock.close()
        return cls(*ports)


@dataclass
class Part:
    """One started process."""

    name: str
    pid: int
    command: list[str]
    url: str | None
    log_file: str
    # A program that rewrites its process title (Redis: "redis-server 127.0.0.1:6379") is
    # recognised by the title's start instead of the command line.
    title: str | None = None
    # supervisord's control socket: the part's state is asked there (its pid changes on a restart).
    socket: str | None = None


@dataclass
class Stack:
    home: str
    ports: Ports
    parts: list[Part] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    supervisor: int | None = None  # supervisord's process id

    def env(self) -> dict[str, str]:
        """The environment of every part, and of a person's shell that should use the stack."""
        return stack_env(Path(self.home), self.ports)

    @property
    def prefect_api(self) -> str:
        return f"http://127.0.0.1:{self.ports.prefect}/api"


def state_path(settings: Settings) -> Path:
    return settings.home.joinpath(*STACK_STATE)


def read_stack(settings: Settings) -> Stack | None:
    path = state_path(settings)
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return Stack(home=raw["home"], ports=Ports(**raw["ports"]), parts=[Part(**p) for p in raw["parts"]],
                 skipped=raw.get("skipped", {}), started_at=raw.get("started_at", 0.0),
                 supervisor=raw.get("supervisor"))


def _write(stack: Stack, settings: Settings) -> None:
    path = state_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(asdict(stack), handle, indent=1)
    tmp.replace(path)


def stack_env(home: Path, ports: Ports) -> dict[str, str]:
    api = f"http://127.0.0.1:{ports.prefect}/api"
    return {
        "FLYWHEEL_HOME": str(home), "FLYWHEEL_REPO": str(REPO_ROOT),
        "FLYWHEEL_SERVING__PORT": str(ports.service),
        "FLYWHEEL_MONITOR__PUSHGATEWAY": f"127.0.0.1:{ports.pushgateway}",
        "FLYWHEEL_MONITOR__PROMETHEUS_URL": f"http://127.0.0.1:{ports.prometheus}",
        # The live streams (flights_live) and their consumer, on the stack's Redis.
        "FLYWHEEL_REDIS_URL": f"redis://127.0.0.1:{ports.redis}/0",
        "PREFECT_HOME": str(home / "prefect"), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
        "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(ports.prefect),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # The worker asks for due runs every 2 s (default 10): automations react in seconds.
        "PREFECT_WORKER_QUERY_SECONDS": "2",
        # New schedules (the demo's) get their runs within 5 s instead of the next minute.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
        "PYTHONPATH": str(REPO_ROOT),
    }


def command_of(pid: int) -> list[str] | None:
    """The command line process ``pid`` runs now, or None if there is no such process."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return []  # alive, command unknown (no /proc)
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def supervisor_rpc(socket_path: str) -> Any:
    """supervisord's XML-RPC interface over its unix socket."""
    import xmlrpc.client

    from supervisor.xmlrpc import SupervisorTransport

    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=SupervisorTransport(None, None,
                                                                                     f"unix://{socket_path}"))


def part_info(part: Part) -> dict[str, Any] | None:
    """What supervisord says of the part (``statename``, ``pid``, ``start``...), or None when
    supervisord does not answer."""
    if part.socket is None:
        return None
    try:
        return supervisor_rpc(part.socket).supervisor.getProcessInfo(part.name)
    except (OSError, Exception):  # noqa: BLE001 - no socket, supervisord gone, an unknown name
        return None


def is_running(part: Part) -> bool:
    """supervisord runs the part; for a part started without it, the recorded process runs the
    recorded command (not a reused id)."""
    if part.socket is not None:
        info = part_info(part)
        return info is not None and info["statename"] == "RUNNING"
    now = command_of(part.pid)
    if now is None:
        return False
    return now == [] or now[: len(part.command)] == part.command or (
        # a console script re-executes as `python <script> ...`
        now[1:1 + len(part.command)] == part.command) or (
        part.title is not None and " ".join(now).startswith(part.title))


def _port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _alive(what: Part | subprocess.Popen[bytes]) -> bool:
    return is_running(what) if isinstance(what, Part) else what.poll() is None


def _wait_http(url: str, part: Part | subprocess.Popen[bytes], log_file: Path, name: str, timeout_s: float) -> None:
    """Until ``url`` answers below 400; a part (or process) that exits first is an error."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(part):
            raise StackError(f"{name} exited while starting; last lines of {log_file}:\n{_tail(log_file)}")
        try:
            if requests.get(url, timeout=2).status_code < 400:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout_s:.0f} s; last lines of {log_file}:\n"
                     f"{_tail(log_file)}")


def _wait_tcp(port: int, part: Part | subprocess.Popen[bytes], log_file: Path, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not _alive(part):
            raise StackError(f"{name} exited while starting:\n{_tail(log_file)}")
        if _port_in_use(port):
            return
        time.sleep(0.2)
    raise StackError(f"{name} did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s:\n{_tail(log_file)}")


def _binary(name: str) -> str | None:
    found = BIN / name
    return str(found) if found.exists() else shutil.which(name)


def prometheus_config(ports: Ports, folder: Path, home: Path) -> Path:
    """monitoring/prometheus/prometheus.yml pointed at this stack's ports, rules and home: the
    services are found through the target files ``serving.control`` writes under ``home`` (one
    per running service, whatever its port), the Pushgateway at the stack's port."""
    from serving.control import targets_dir

    source = REPO_ROOT / "monitoring" / "prometheus"
    config = yaml.safe_load((source / "prometheus.yml").read_text())
    config["rule_files"] = [str(path) for path in sorted((source / "rules").glob("*.yml"))]
    config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{ports.alertmanager}"]
    static = {"pushgateway": ports.pushgateway}
    for scrape in config["scrape_configs"]:
        for discovery in scrape.get("file_sd_configs", []):
            discovery["files"] = [str(targets_dir(home) / "*.json")]
        if "static_configs" in scrape:
            scrape["static_configs"][0]["targets"] = [f"127.0.0.1:{static[scrape['job_name']]}"]
    targets_dir(home).mkdir(parents=True, exist_ok=True)
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _start_supervisord(folder: Path, env: dict[str, str], socket_path: str,
                       timeout_s: float = 30.0) -> subprocess.Popen[bytes]:
    """supervisord in the foreground of its own session (its children inherit ``env``), with a
    configuration that holds no program yet (``_add_program`` adds each in turn)."""
    (folder / "programs").mkdir(exist_ok=True)
    for old in (folder / "programs").glob("*.conf"):
        old.unlink()
    conf = folder / "supervisord.conf"
    conf.write_text(textwrap.dedent(f"""\
        [unix_http_server]
        file={socket_path}
        chmod=0700

        [supervisord]
        logfile={folder / "logs" / "supervisord.log"}
        pidfile={folder / "supervisord.pid"}
        childlogdir={folder / "logs"}
        nodaemon=true

        [rpcinterface:supervisor]
        supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

        [supervisorctl]
        serverurl=unix://{socket_path}

        [include]
        files={folder / "programs"}/*.conf
        """).replace("%", "%%"))
    log_file = folder / "logs" / "supervisord.log"
    with open(folder / "logs" / "supervisord.out", "ab") as out:
        process = subprocess.Popen([str(BIN / "supervisord"), "-c", str(conf)], cwd=REPO_ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise StackError(f"supervisord exited with code {process.returncode}:\n{_tail(log_file)}")
        try:
            if supervisor_rpc(socket_path).supervisor.getState()["statename"] == "RUNNING":
                return process
        except (OSError, Exception):  # noqa: BLE001 - not listening yet
            pass
        time.sleep(0.2)
    raise StackError(f"supervisord did not start within {timeout_s:.0f} s:\n{_tail(log_file)}")


def _add_program(rpc: Any, folder: Path, name: str, command: list[str], extra_env: dict[str, str],
                 order: int) -> None:
    """A supervised program: restarted when it dies (after 1 s up, at most 3 quick retries),
    its process group stopped with it (the worker with SIGINT, as a Prefect worker whose server
    is gone may ignore SIGTERM), its output in ``logs/<name>.log``."""
    environment = ",".join(f'{key}="{value}"' for key, value in extra_env.items())
    lines = [f"[program:{name}]", f"command={shlex.join(command)}", f"directory={REPO_ROOT}",
             "autostart=false", "autorestart=true", "startsecs=1", "startretries=3",
             f"priority={100 + order}", f"stopsignal={'INT' if name == 'worker' else 'TERM'}", "stopwaitsecs=30",
             "stopasgroup=true", "killasgroup=true", "redirect_stderr=true",
             f"stdout_logfile={folder / 'logs' / f'{name}.log'}", "stdout_logfile_maxbytes=20MB",
             "stdout_logfile_backups=2"]
    if environment:
        lines.append(f"environment={environment}")
    (folder / "programs" / f"{name}.conf").write_text("\n".join(lines).replace("%", "%%") + "\n")
    rpc.supervisor.reloadConfig()
    rpc.supervisor.addProcessGroup(name)


def _run(command: list[str], env: dict[str, str], what: str, timeout_s: float = 300) -> None:
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        raise StackError(f"{what} failed ({' '.join(command[:4])} ...): {(done.stdout + done.stderr)[-2000:]}")


def up(settings: Settings, ports: Ports, dataset: str, serve: bool = True, wait_s: float = 180.0) -> Stack:
    """Start every part, each recorded as soon as it runs (a failure half way leaves a state
    ``down`` can clean up). Refuses to start over a running stack or on a port in use."""
    running = read_stack(settings)
    if running is not None and any(is_running(p) for p in running.parts):
        raise StackError(f"a stack is already up under {settings.home} (Prefect UI on "
                         f"http://127.0.0.1:{running.ports.prefect}); `make down` first")
    busy = [f"{name} {port}" for name, port in asdict(ports).items() if _port_in_use(port)]
    if busy:
        raise StackError(f"ports in use on 127.0.0.1: {', '.join(busy)}; stop what holds them "
                         f"(or use other ports)")
    home = settings.home.resolve()
    folder = home / "stack"
    (folder / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(home=str(home), ports=ports)
    env = {**os.environ, **stack.env()}
    for key in ("PREFECT_PROFILE",):
        env.pop(key, None)

    socket_path = str(folder / "supervisor.sock")
    supervisord = _start_supervisord(folder, env, socket_path)
    stack.supervisor = supervisord.pid
    _write(stack, settings)
    rpc = supervisor_rpc(socket_path)

    def start(name: str, command: list[str], url: str | None, health: str | None,
              extra_env: dict[str, str] | None = None, tcp_port: int | None = None, title: str | None = None) -> None:
        log_file = folder / "logs" / f"{name}.log"
        _add_program(rpc, folder, name, command, extra_env or {}, len(stack.parts))
        rpc.supervisor.startProcess(name, True)
        part = Part(name, rpc.supervisor.getProcessInfo(name)["pid"], command, url, str(log_file), title, socket_path)
        stack.parts.append(part)
        _write(stack, settings)
        if health:
            _wait_http(health, part, log_file, name, wait_s)
        if tcp_port:
            _wait_tcp(tcp_port, part, log_file, name, wait_s)
        log.info("%s is up%s (process %d, supervised)", name, f" at {url}" if url else "", part.pid)

    prefect = _binary("prefect")
    assert prefect, "prefect is installed with the project"
    start("prefect-server", [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(ports.prefect)],
          f"http://127.0.0.1:{ports.prefect}", f"http://127.0.0.1:{ports.prefect}/api/health")
    _run([prefect, "work-pool", "create", WORK_POOL, "--type", "process", "--overwrite"], env, "creating the work pool")
    _run([prefect, "--no-prompt", "deploy", "--all", "--prefect-file", "deployments/prefect.yaml"], env,
         "registering the deployments")
    start("worker", [prefect, "worker", "start", "--pool", WORK_POOL, "--name", "flywheel-local-worker"], None, None)

    missing = "not installed (Debian: apt-get install prometheus prometheus-pushgateway prometheus-alertmanager)"
    alertmanager_yml = REPO_ROOT / "monitoring" / "alertmanager" / "alertmanager.yml"
    daemons = [  # (part, Debian binary, port, arguments)
        ("pushgateway", "prometheus-pushgateway", ports.pushgateway,
         [f"--persistence.file={folder / 'pushgateway.data'}"]),
        ("alertmanager", "prometheus-alertmanager", ports.alertmanager,
         [f"--config.file={alertmanager_yml}", f"--storage.path={folder / 'alertmanager'}",
          f"--cluster.listen-address=127.0.0.1:{ports.alertmanager_cluster}"]),
        ("prometheus", "prometheus", ports.prometheus,
         [f"--config.file={prometheus_config(ports, folder, home)}", f"--storage.tsdb.path={folder / 'prometheus'}"]),
    ]
    for name, binary_name, port, arguments in daemons:
        binary = _binary(binary_name)
        if binary is None:
            stack.skipped[name] = missing
            continue
        url = f"http://127.0.0.1:{port}"
        start(name, [binary, f"--web.listen-address=127.0.0.1:{port}", *arguments], url, f"{url}/-/ready")

    redis_server = _binary("redis-server")
    if redis_server is None:
        stack.skipped["redis"] = "not installed (Debian: apt-get install redis-server); stream-fed datasets need it"
    else:  # the streams' log: append-only file under the stack's folder, so a restart loses nothing
        (folder / "redis").mkdir(exist_ok=True)
        start("redis", [redis_server, "--bind", "127.0.0.1", "--port", str(ports.redis), "--dir", str(folder / "redis"),
                        "--appendonly", "yes", "--save", ""], f"redis://127.0.0.1:{ports.redis}/0", None,
              tcp_port=ports.redis, title=f"{redis_server} 127.0.0.1:{ports.redis}")
    start("mlflow-ui", [str(BIN / "mlflow"), "server", "--backend-store-uri", settings.tracking_uri,
                        "--host", "127.0.0.1", "--port", str(ports.mlflow), "--workers", "1"],
          f"http://127.0.0.1:{ports.mlflow}", f"http://127.0.0.1:{ports.mlflow}/health",
          # One web worker and no job runner (its eight huey consumers are for GenAI jobs).
          {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    start("evidently-ui", [str(BIN / "evidently"), "ui", "--workspace", str(home / "evidently"),
                           "--host", "127.0.0.1", "--port", str(ports.evidently)],
          f"http://127.0.0.1:{ports.evidently}", f"http://127.0.0.1:{ports.evidently}/")

    if serve:
        from core.registry import CHAMPION, Registry
        from flows._runtime import model_name_for

        name = model_name_for(dataset)
        registry = Registry.for_uri(settings.tracking_uri)
        if registry.exists(name) and registry.version_by_alias(name, CHAMPION) is not None:
            _run([sys.executable, "-m", "flows.deploy", "serve", "--dataset", dataset], env, "starting the service",
                 timeout_s=wait_s + 60)
        else:
            stack.skipped["service"] = (f"{name} has no champion yet: the serve-registered deployment starts the "
                                        f"service on port {ports.service} when a training run registers one")
    _write(stack, settings)
    return stack


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _gone(pid: int) -> bool:
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        if finished == pid:
            return True
    except ChildProcessError:
        pass
    return command_of(pid) is None


def stop_part(part: Part, timeout_s: float = 30.0) -> bool:
    """Stop one recorded process group: SIGTERM (the worker: SIGINT, as a Prefect worker whose
    server is gone may ignore SIGTERM), then the other, SIGKILL after ``timeout_s``."""
    if not is_running(part):
        return False
    order = (signal.SIGINT, signal.SIGTERM) if part.name == "worker" else (signal.SIGTERM, signal.SIGINT)
    for sig in order:
        _signal_group(part.pid, sig)
        deadline = time.monotonic() + timeout_s / 2
        while time.monotonic() < deadline:
            if _gone(part.pid):
                return True
            time.sleep(0.2)
    _signal_group(part.pid, signal.SIGKILL)
    return True


def down(settings: Settings) -> list[str]:
    """Stop the services the stack's runs started, then the parts in reverse order of start.
    Returns what was stopped."""
    from serving.control import read_state, state_file
    from serving.control import stop as stop_service

    stopped: list[str] = []
    for path in sorted((settings.home / "serving").glob("*.json")):
        served = read_state(settings, path.stem)
        # The record of a service that is gone goes too, with its Prometheus target.
        if served is not None and stop_service(served, state_file(settings, path.stem)):
            stopped.append(f"service {path.stem} (process {served.pid})")
    stack = read_stack(settings)
    if stack is None:
        return stopped
    for part in reversed(stack.parts):
        if part.socket is not None:
            if is_running(part):
                supervisor_rpc(part.socket).supervisor.stopProcess(part.name, True)
                stopped.append(f"{part.name} (supervised)")
        elif stop_part(part):
            stopped.append(f"{part.name} (process {part.pid})")
    if stack.supervisor is not None and command_of(stack.supervisor) is not None:
        _signal_group(stack.supervisor, signal.SIGTERM)  # stops what is left, then exits
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline and not _gone(stack.supervisor):
            time.sleep(0.2)
        if not _gone(stack.supervisor):
            _signal_group(stack.supervisor, signal.SIGKILL)
        stopped.append(f"supervisord (process {stack.supervisor})")
    state_path(settings).unlink(missing_ok=True)
    return stopped


def status(settings: Settings) -> dict[str, Any]:
    """Each recorded part: running or not, and where."""
    stack = read_stack(settings)
    if stack is None:
        return {}
    parts: dict[str, Any] = {}
    for part in stack.parts:
        info = part_info(part)
        if info is None:
            parts[part.name] = {"running": is_running(part), "state": "UNKNOWN", "pid": part.pid, "url": part.url,
                                "log": part.log_file}
        else:
            parts[part.name] = {"running": info["statename"] == "RUNNING", "state": info["statename"],
                                "pid": info["pid"], "since": info["start"], "url": part.url, "log": part.log_file}
    return parts | {name: {"running": False, "skipped": why} for name, why in stack.skipped.items()}
