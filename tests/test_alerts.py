"""Prometheus rules and Alertmanager config: checked, unit-tested, and one alert end to end
(Pushgateway -> Prometheus -> Alertmanager -> a webhook on 127.0.0.1); and Prometheus, as
`make up` configures it, finding a service through the target file the service control writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import yaml

from tests.conftest import free_port, need_service

REPO = Path(__file__).resolve().parent.parent
PROMETHEUS = REPO / "monitoring" / "prometheus"
ALERTMANAGER = REPO / "monitoring" / "alertmanager" / "alertmanager.yml"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        need_service(f"{name} is not installed (Debian: prometheus, prometheus-alertmanager, "
                     "prometheus-pushgateway; .ci/run installs them)")
    assert path is not None
    return path


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr



def stop_all(processes: list[subprocess.Popen]) -> None:
    """Terminate the servers a test started, then kill any still there after 20 s."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()

def test_rules_and_configs_pass_promtool_and_amtool():
    assert "SUCCESS: 7 rules found" in run(tool("promtool"), "check", "rules", str(PROMETHEUS / "rules" / "flywheel.yml"))
    assert "SUCCESS" in run(tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert "SUCCESS" in run(tool("amtool"), "check-config", str(ALERTMANAGER))
    # The rules' own unit tests: each alert fires when it should and not before.
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", str(PROMETHEUS / "tests" / "flywheel_test.yml"))


class Hooks(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Hooks.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:  # noqa: ANN002
        pass


def start(command: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=open(log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: exited {process.returncode}: {log.read_text()[-2000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} not ready: {log.read_text()[-2000:]}")


def test_drift_pushed_by_the_monitor_reaches_a_webhook_through_prometheus_and_alertmanager(tmp_path):
    from tasks.monitor import push_gauges

    prometheus, alertmanager, pushgateway = tool("prometheus"), tool("prometheus-alertmanager"), \
        tool("prometheus-pushgateway")
    ports = {name: free_port() for name in ("prometheus", "alertmanager", "alertmanager_cluster", "pushgateway",
                                            "webhook")}
    Hooks.received = []
    hooks = ThreadingHTTPServer(("127.0.0.1", ports["webhook"]), Hooks)
    threading.Thread(target=hooks.serve_forever, daemon=True).start()

    # The real configs, pointed at this test's ports and made fast.
    am_config = yaml.safe_load(ALERTMANAGER.read_text())
    am_config["route"].update(group_wait="1s", group_interval="1s")
    am_config["receivers"][0]["webhook_configs"][0]["url"] = f"http://127.0.0.1:{ports['webhook']}/alerts"
    (tmp_path / "alertmanager.yml").write_text(yaml.safe_dump(am_config))
    run(tool("amtool"), "check-config", str(tmp_path / "alertmanager.yml"))
    prom_config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    prom_config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    prom_config["rule_files"] = [str(PROMETHEUS / "rules" / "flywheel.yml")]
    prom_config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] = [
        f"127.0.0.1:{ports['alertmanager']}"]
    prom_config["scrape_configs"] = [c for c in prom_config["scrape_configs"] if c["job_name"] == "pushgateway"]
    prom_config["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{ports['pushgateway']}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_config))

    processes = []
    try:
        processes.append(start([pushgateway, f"--web.listen-address=127.0.0.1:{ports['pushgateway']}",
                                 f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                               tmp_path / "pushgateway.log"))
        processes.append(start([alertmanager, f"--config.file={tmp_path / 'alertmanager.yml'}",
                                f"--storage.path={tmp_path / 'am-data'}",
                                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
                                f"--cluster.listen-address=127.0.0.1:{ports['alertmanager_cluster']}"],
                               tmp_path / "alertmanager.log"))
        processes.append(start([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                                f"--web.listen-address=127.0.0.1:{ports['prometheus']}"], tmp_path / "prometheus.log"))
        wait_http(f"http://127.0.0.1:{ports['pushgateway']}/-/ready", processes[0], tmp_path / "pushgateway.log")
        wait_http(f"http://127.0.0.1:{ports['alertmanager']}/-/ready", processes[1], tmp_path / "alertmanager.log")
        wait_http(f"http://127.0.0.1:{ports['prometheus']}/-/ready", processes[2], tmp_path / "prometheus.log")

        # What flows.monitor pushes when it finds drift.
        push_gauges(f"127.0.0.1:{ports['pushgateway']}", "flywheel_monitor",
                    {"flywheel_drift_detected": 1.0, "flywheel_drift_share": 0.5,
                     "flywheel_monitor_last_run_timestamp_seconds": time.time()},
                    {"model_name": "flywheel-flights"})
        def fired() -> list[dict]:
            return [a for m in Hooks.received for a in m.get("alerts", [])
                    if a["labels"].get("alertname") == "FlywheelDriftDetected"
                    and a["labels"].get("model_name") == "flywheel-flights"]

        deadline = time.time() + 90
        while time.time() < deadline and not fired():
            time.sleep(0.5)
        alerts = [a for m in Hooks.received for a in m.get("alerts", [])]
        assert fired(), f"no alert reached the webhook: {alerts}; {(tmp_path / 'prometheus.log').read_text()[-1500:]}"
        assert fired()[0]["status"] == "firing"
        assert fired()[0]["annotations"]["summary"] == "Data drift on the live inputs of flywheel-flights"
    finally:
        stop_all(processes)
        hooks.shutdown()


@pytest.mark.parametrize("failed", [True, False])
def test_a_flow_pushes_its_outcome_when_a_pushgateway_is_configured(failed, tmp_path, monkeypatch):
    """flows._runtime.push_outcome: the gauge the FlywheelFlowRunFailed alert reads."""
    from core.settings import configure
    from flows._runtime import push_outcome

    gateway = tool("prometheus-pushgateway")
    port = free_port()
    process = start([gateway, f"--web.listen-address=127.0.0.1:{port}",
                                 f"--persistence.file={tmp_path / 'pushgateway.data'}"], tmp_path / "pg.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/-/ready", process, tmp_path / "pg.log")
        settings = configure(home=str(tmp_path / "home"), monitor={"pushgateway": f"127.0.0.1:{port}"})
        push_outcome(settings, "ingest", failed=failed)
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        line = next(line for line in text.splitlines() if line.startswith("flywheel_flow_run_failed{"))
        assert 'flow="ingest"' in line and 'job="flywheel_flows"' in line
        assert float(line.rsplit(" ", 1)[1]) == (1.0 if failed else 0.0)
    finally:
        configure()
        process.terminate()
        process.wait(timeout=20)


# A stand-in for the service: its /metrics on the port given, and the service's name on its
# command line (so serving.control.stop takes it for ours and stops it as it stops the service).
METRICS_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

class Metrics(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b'flywheel_predictions_total{variant="champion",model_version="1"} 3\\n'
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", int(sys.argv[1])), Metrics).serve_forever()
"""


@pytest.mark.slow
def test_prometheus_finds_a_started_service_by_its_target_file_and_drops_it_when_stopped(tmp_path):
    """devstack's Prometheus config reads <home>/prometheus/targets/*.json: the target file
    serving.control writes for a ready service is picked up while Prometheus runs (the
    service is scraped, up, its series labelled with model and dataset), and stopping the
    service removes the file, so Prometheus drops the target."""
    from core.settings import configure
    from devstack.stack import Ports, prometheus_config
    from serving.control import SERVICE, Served, stop, target_file, write_target

    prometheus = tool("prometheus")
    ports = {"prometheus": free_port(), "service": free_port()}
    settings = configure(home=str(tmp_path / "home"))
    config = yaml.safe_load(prometheus_config(Ports(pushgateway=free_port()), tmp_path, settings.home).read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    del config["alerting"], config["rule_files"]  # discovery only: no Alertmanager, no rules
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    (discovery,) = config["scrape_configs"][0]["file_sd_configs"]
    assert discovery["files"] == [str(settings.home / "prometheus" / "targets" / "*.json")]

    api = f"http://127.0.0.1:{ports['prometheus']}/api/v1"
    processes = []

    def serving_targets() -> list[dict]:
        answer = requests.get(f"{api}/targets", params={"state": "active"}, timeout=5).json()
        return [t for t in answer["data"]["activeTargets"] if t["labels"].get("job") == "flywheel-serving"]

    try:
        processes.append(start([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'prom-data'}",
                                f"--web.listen-address=127.0.0.1:{ports['prometheus']}"], tmp_path / "prometheus.log"))
        service = subprocess.Popen([sys.executable, "-c", METRICS_SERVER, str(ports["service"]), SERVICE],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        processes.append(service)
        wait_http(f"http://127.0.0.1:{ports['prometheus']}/-/ready", processes[0], tmp_path / "prometheus.log")
        wait_http(f"http://127.0.0.1:{ports['service']}/metrics", service, tmp_path / "prometheus.log")
        assert serving_targets() == []

        served = Served(service.pid, "127.0.0.1", ports["service"], "flights", "flywheel-flights", "lake", 0.1, False,
                        None, time.time(), "log", None, str(target_file(settings, "flywheel-flights", ports["service"])))
        path = write_target(served)
        assert path is not None and path.name == f"flywheel-flights-{ports['service']}.json"
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
        deadline = time.time() + 30
        found: list[dict] = []
        while time.time() < deadline and not (found and found[0]["health"] == "up"):
            time.sleep(0.5)
            found = serving_targets()
        assert len(found) == 1 and found[0]["health"] == "up", (found, (tmp_path / "prometheus.log").read_text()[-1500:])
        assert found[0]["labels"]["model"] == "flywheel-flights" and found[0]["labels"]["dataset"] == "flights"
        assert found[0]["scrapeUrl"] == f"http://127.0.0.1:{ports['service']}/metrics"
        answer = requests.get(f"{api}/query", params={"query": 'flywheel_predictions_total{model="flywheel-flights"}'},
                              timeout=5).json()
        assert [r["metric"]["dataset"] for r in answer["data"]["result"]] == ["flights"], answer

        state = tmp_path / "flywheel-flights.json"
        state.write_text("{}")
        assert stop(served, state, timeout_s=10) is True  # it ran: stopped as the service is stopped
        assert service.poll() is not None and not path.exists() and not state.exists()
        deadline = time.time() + 30
        while time.time() < deadline and serving_targets():
            time.sleep(0.5)
        assert serving_targets() == [], "Prometheus still scrapes a stopped service"
    finally:
        configure()
        stop_all(processes)
