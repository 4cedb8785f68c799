"""How ``serve`` merges the options it is given with a running service and the settings."""

from __future__ import annotations

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
