"""How ``serve`` merges the options it is given with a running service and the settings; and
the Prometheus target file that announces a service, removed with it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict

from core.settings import ServingSettings
from serving.control import Served, ServeOptions, serve_plan

CONFIG = ServingSettings(port=3000, challenger_share=0.1, shadow=False)


def served(**own) -> Served:
    values = {"pid": 1, "host": "127.0.0.1", "port": 3005, "dataset": "flights", "model_name": "m", "lake": "/l",
              "challenger_share": 0.25, "shadow": True, "routing_field": "tailnum", "started_at": 0.0,
              "log_file": "/l/log", **own}
    return Served(**values)


def asked(**options) -> dict:
    return {"action": "serve", "dataset": "flights", "host": None, "port": None, "challenger_share": None,
            "shadow": None, "routing_field": None, **options}


def test_nothing_running_starts_with_what_is_asked_over_the_settings():
    assert serve_plan(CONFIG, asked(), None) == ("start", ServeOptions("127.0.0.1", 3000, 0.1, False, None))
    assert serve_plan(CONFIG, asked(port=3100, shadow=True), None) == (
        "start", ServeOptions("127.0.0.1", 3100, 0.1, True, None))


def test_a_running_service_asked_nothing_new_reloads_and_keeps_its_traffic_split():
    """The deploy run a registration triggers names no option: the split a person chose stays."""
    running = served()
    assert serve_plan(CONFIG, asked(), running) == ("reload", ServeOptions("127.0.0.1", 3005, 0.25, True, "tailnum"))
    assert serve_plan(CONFIG, asked(challenger_share=0.25, port=3005), running)[0] == "reload"


def test_other_options_restart_it_with_those_over_its_own_not_over_the_settings():
    what, options = serve_plan(CONFIG, asked(challenger_share=0.5), served())
    assert what == "restart"
    assert options == ServeOptions("127.0.0.1", 3005, 0.5, True, "tailnum")  # not port 3000, not shadow off


def _gone_pid() -> int:
    """The id of a process that has exited (no service runs under it)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_service_is_announced_to_prometheus_by_a_target_file_that_goes_with_it(home):
    from serving.control import _write_state, running, state_file, stop, target_file, write_target

    recorded = served(pid=_gone_pid(), host="0.0.0.0", port=3001, model_name="flywheel-flights",
                      target=str(target_file(home, "flywheel-flights", 3001)))
    path = write_target(recorded)
    assert path == home.home / "prometheus" / "targets" / "flywheel-flights-3001.json"
    # Prometheus' file_sd format; a service bound to every interface is scraped on loopback.
    assert json.loads(path.read_text()) == [{"targets": ["127.0.0.1:3001"],
                                            "labels": {"model": "flywheel-flights", "dataset": "flights"}}]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written whole: no temporary file left
    assert write_target(recorded) == path and len(list(path.parent.iterdir())) == 1  # rewritten in place

    # The record of a service that is gone is forgotten with its target...
    _write_state(state_file(home, "flywheel-flights"), recorded)
    assert running(home, "flywheel-flights") is None
    assert not path.exists() and not state_file(home, "flywheel-flights").exists()
    # ...and stopping it (make down, flows.deploy stop) removes both too.
    write_target(recorded)
    _write_state(state_file(home, "flywheel-flights"), recorded)
    assert stop(recorded, state_file(home, "flywheel-flights")) is False  # it was not running
    assert not path.exists() and not state_file(home, "flywheel-flights").exists()


def test_a_record_from_before_targets_still_reads_and_stops(home):
    """A state file written before target files existed has no `target`: it loads, announces
    nothing and stops as before."""
    from serving.control import read_state, state_file, stop, write_target

    old = {k: v for k, v in asdict(served(pid=_gone_pid())).items() if k != "target"}
    state_file(home, "m").parent.mkdir(parents=True, exist_ok=True)
    state_file(home, "m").write_text(json.dumps(old))
    recorded = read_state(home, "m")
    assert recorded is not None and recorded.target is None
    assert write_target(recorded) is None
    assert stop(recorded, state_file(home, "m")) is False and not state_file(home, "m").exists()
