"""A real ``prefect server start`` on 127.0.0.1 with its own database and a free port, for tests
and benchmarks (``make up`` runs the stack's own through ``devstack.stack``)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrefectServer:
    """A real ``prefect server start`` on 127.0.0.1 with its own database, which a test can
    kill and start again on the same port and database (an outage)."""

    def __init__(self, folder: Path, ui: bool = False):
        import sys

        self.folder, self.port = folder, _free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {**os.environ, "PREFECT_HOME": str(folder / "prefect"), "PREFECT_API_URL": self.api,
                    "PREFECT_UI_API_URL": self.api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_ENABLED": "true" if ui else "false"}
        self.command = [str(Path(sys.executable).parent / "prefect"), "server", "start", "--host", "127.0.0.1",
                        "--port", str(self.port)]
        self.process: subprocess.Popen[bytes] | None = None
        self.log = folder / "prefect-server.log"

    def start(self, timeout_s: float = 120) -> None:
        import time

        import requests

        with open(self.log, "ab") as out:
            process = self.process = subprocess.Popen(self.command, env=self.env, stdout=out,
                                                      stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            assert process.poll() is None, self.log.read_text()[-2000:]
            try:
                if requests.get(f"{self.api}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("the Prefect server did not start: " + self.log.read_text()[-2000:])

    def stop(self, kill: bool = False) -> None:
        import signal

        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
