"""Start and stop a multi-process Ray cluster on this machine, kept on 127.0.0.1.

``python -m compute.ray_cluster start --nodes 2`` prints the address to put in
``FLYWHEEL_RAY__ADDRESS``; ``python -m compute.ray_cluster stop [--address A]`` ends it (or every
cluster this module started). Tests use the same functions.

Each node's ``ray start`` runs in a session of its own, and every process of that node (GCS,
raylet, agents, and the workers the raylet forks later) stays in its process group. ``stop``
ends those groups and nothing else: not ``ray stop --force``, which ends every Ray process of
the user (found: a test's cluster stop killed the Ray of a demo running beside it).

Ray 2.60 rewrites ``--node-ip-address=127.0.0.1`` to the machine's address (Ray issue #59110),
after which a second node or a driver hangs instead of failing. The head is
therefore started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which keeps it on 127.0.0.1 but
makes a plain ``ray start --address`` refuse), and further nodes run Ray's CLI with
``resolve_ip_for_localhost`` returning its argument unchanged. Drivers connecting to such a
cluster need ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` as well (``compute.ray_session`` sets it for
loopback addresses).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from compute.ray_compat import PATCHED_CLI

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _state_dir() -> Path:
    """Where each started cluster's process groups are recorded (one file per cluster)."""
    return Path(tempfile.gettempdir()) / f"flywheel-ray-clusters-{os.getuid()}"


def _start_node(command: list[str], env: dict[str, str], timeout_s: int) -> int:
    """Run one node's ``ray start`` as a session leader; returns its process group id."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _end_groups([process.pid], grace_s=5)
        raise
    if process.returncode != 0:
        _end_groups([process.pid], grace_s=5)
        raise RuntimeError(f"`ray start` failed (exit {process.returncode}): {output.decode(errors='replace')[-2000:]}")
    return process.pid


def _group_members(groups: set[int]) -> list[int]:
    """The live Ray processes in these process groups (a group id the system gave to something
    else since, after the cluster ended, is never a Ray process of it: those are skipped)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # it ended while we looked
            continue
        if fields[0] == "Z" or int(fields[2]) not in groups:  # state, parent pid, pgrp; a zombie is done
            continue
        try:
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray" in command:  # gcs_server, raylet, ray::workers and agents, Ray's python helpers
            members.append(int(entry.name))
    return members


def _name(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _end_groups(groups: list[int], grace_s: float = 30) -> None:
    """SIGTERM every process of these groups; SIGKILL what is left after ``grace_s``."""
    wanted = set(groups)
    for pid in _group_members(wanted):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while (left := _group_members(wanted)) and time.monotonic() < deadline:
        if all(_name(pid) == "gcs_server" for pid in left):
            break  # the GCS does not end on SIGTERM (as `ray stop --force`, it is killed)
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    while left and (left := _group_members(wanted)) and time.monotonic() < deadline:
        time.sleep(0.1)  # a killed process is gone once the kernel has torn it down


def start(nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 256 * 1024**2,
          timeout_s: int = 120) -> str:
    """Start a head and ``nodes - 1`` more nodes on 127.0.0.1; returns ``127.0.0.1:<port>``."""
    port = _free_port()
    address = f"127.0.0.1:{port}"
    common = ["--num-cpus", str(cpus_per_node), "--node-ip-address", "127.0.0.1",
              "--object-store-memory", str(object_store_bytes), "--disable-usage-stats"]
    state = _state_dir()
    state.mkdir(parents=True, exist_ok=True)
    record = state / f"{port}.json"
    groups: list[int] = []
    try:
        groups.append(_start_node(
            [_ray_cli(), "start", "--head", "--port", str(port), "--include-dashboard=false", "--dashboard-host",
             "127.0.0.1", "--ray-client-server-port", str(_free_port()), *common],
            {**os.environ, **LOOPBACK_ENV}, timeout_s))
        record.write_text(json.dumps({"address": address, "groups": groups}))
        worker_env = {**os.environ, **LOOPBACK_ENV}
        worker_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # with it set, `ray start --address` refuses
        for _ in range(nodes - 1):
            groups.append(_start_node([sys.executable, "-c", PATCHED_CLI, "start", "--address", address, *common],
                                      worker_env, timeout_s))
            record.write_text(json.dumps({"address": address, "groups": groups}))
    except BaseException:
        _end_groups(groups, grace_s=10)
        record.unlink(missing_ok=True)
        raise
    return address


def stop(address: str | None = None, grace_s: float = 3) -> list[str]:
    """Stop the cluster at ``address`` that :func:`start` started (default: every one it
    started on this machine for this user); returns the addresses stopped. Its processes get
    SIGTERM, and SIGKILL after ``grace_s`` (the GCS never ends on SIGTERM; ``ray stop --force``
    kills at once). Other Ray processes, started by anyone or anything else, are left alone."""
    stopped = []
    for record in sorted(_state_dir().glob("*.json")):
        try:
            state = json.loads(record.read_text())
        except (OSError, ValueError):
            continue
        if address is not None and state.get("address") != address:
            continue
        _end_groups([int(g) for g in state.get("groups", [])], grace_s=grace_s)
        record.unlink(missing_ok=True)
        # `ray start` left its address for a bare ray.init() to find; a stopped cluster's address
        # would make the next ray.init() of this machine try to join it (``ray stop`` removes it).
        current = Path(os.environ.get("RAY_TMPDIR") or Path(tempfile.gettempdir()) / "ray") / "ray_current_cluster"
        try:
            if current.read_text().strip() == state.get("address"):
                current.unlink()
        except OSError:
            pass
        stopped.append(str(state.get("address")))
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.ray_cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start a head and more nodes on 127.0.0.1")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=1)
    down = sub.add_parser("stop", help="stop a cluster started by `start` (default: every one), nothing else")
    down.add_argument("--address", default=None, help="127.0.0.1:<port> as `start` printed it")
    args = parser.parse_args(argv)
    if args.command == "stop":
        stopped = stop(args.address)
        print(f"stopped: {', '.join(stopped)}" if stopped else "no cluster started by compute.ray_cluster is running")
        return 0
    address = start(args.nodes, args.cpus_per_node)
    print(f"export FLYWHEEL_RAY__ADDRESS={address} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
