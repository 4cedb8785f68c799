"""Start and stop a multi-process Ray cluster on this machine, kept on 127.0.0.1.

``python -m compute.ray_cluster start --nodes 2`` prints the address to put in
``FLYWHEEL_RAY__ADDRESS``; ``python -m compute.ray_cluster stop`` ends it. Tests use the same
functions. Ray 2.60 rewrites ``--node-ip-address=127.0.0.1`` to the machine's address (Ray
issue #59110), after which a second node or a driver hangs instead of failing. The head is
therefore started with ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (which keeps it on 127.0.0.1 but
makes a plain ``ray start --address`` refuse), and further nodes run Ray's CLI with
``resolve_ip_for_localhost`` returning its argument unchanged. Drivers connecting to such a
cluster need ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` as well (``compute.ray_session`` sets it for
loopback addresses).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled",
                "RAY_USAGE_STATS_ENABLED": "0"}
_PATCHED_CLI = (
    "import sys, ray._private.services as s\n"
    "s.resolve_ip_for_localhost = lambda host: host  # Ray issue #59110\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "main()\n"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def start(nodes: int = 2, cpus_per_node: int = 1, object_store_bytes: int = 256 * 1024**2,
          timeout_s: int = 120) -> str:
    """Start a head and ``nodes - 1`` more nodes on 127.0.0.1; returns ``127.0.0.1:<port>``."""
    port = _free_port()
    common = ["--num-cpus", str(cpus_per_node), "--node-ip-address", "127.0.0.1",
              "--object-store-memory", str(object_store_bytes), "--disable-usage-stats"]
    subprocess.run([_ray_cli(), "start", "--head", "--port", str(port), "--include-dashboard=false",
                    "--dashboard-host", "127.0.0.1", "--ray-client-server-port", str(_free_port()), *common],
                   env={**os.environ, **LOOPBACK_ENV}, check=True, capture_output=True, timeout=timeout_s)
    address = f"127.0.0.1:{port}"
    worker_env = {**os.environ, **LOOPBACK_ENV}
    worker_env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")  # with it set, `ray start --address` refuses
    for _ in range(nodes - 1):
        subprocess.run([sys.executable, "-c", _PATCHED_CLI, "start", "--address", address, *common],
                       env=worker_env, check=True, capture_output=True, timeout=timeout_s)
    return address


def stop(timeout_s: int = 120) -> None:
    """Stop every Ray process of this machine's user (``ray stop --force``)."""
    subprocess.run([_ray_cli(), "stop", "--force"], capture_output=True, timeout=timeout_s,
                   env={**os.environ, **LOOPBACK_ENV})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.ray_cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("start", help="start a head and more nodes on 127.0.0.1")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=1)
    sub.add_parser("stop", help="ray stop --force")
    args = parser.parse_args(argv)
    if args.command == "stop":
        stop()
        return 0
    address = start(args.nodes, args.cpus_per_node)
    print(f"export FLYWHEEL_RAY__ADDRESS={address} RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0")
    return 0


if __name__ == "__main__":
    sys.exit(main())
