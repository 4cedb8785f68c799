"""The automations of ``deployments/prefect.yaml`` listen for events Flywheel emits, named in
one place (``core.events``): a trigger on a misspelt or renamed event would never fire."""

from __future__ import annotations

import ast
from pathlib import Path

import yaml

from core import events

REPO = Path(__file__).resolve().parent.parent


def triggers() -> list[dict]:
    document = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return [t for d in document["deployments"] for t in d.get("triggers") or []]


def test_every_trigger_expects_an_event_flywheel_emits_about_a_model():
    found = triggers()
    assert found, "prefect.yaml has no triggers"
    for trigger in found:
        assert set(trigger["expect"]) <= events.EVENTS, trigger["expect"]
        resource = trigger["match"]["prefect.resource.id"]
        assert resource.startswith(events.MODEL_RESOURCE_PREFIX.rstrip(".")), resource


def test_the_retraining_and_serving_automations_listen_for_their_events():
    expected = {name for trigger in triggers() for name in trigger["expect"]}
    assert {events.DRIFT_DETECTED, events.PERFORMANCE_DEGRADED, events.MODEL_REGISTERED} <= expected


def test_every_trigger_has_a_unique_name_and_a_description():
    """`prefect deploy` names a trigger's automation after the trigger's `name` (without one:
    `<deployment>__automation_<n>`, "A custom trigger" in the UI) and gives it the trigger's
    `description`: the Automations page should say what each one is for."""
    found = triggers()
    unnamed = [t["expect"] for t in found if not str(t.get("name") or "").strip()]
    assert not unnamed, f"triggers without a name: {unnamed}"
    undescribed = [t["name"] for t in found if not str(t.get("description") or "").strip()]
    assert not undescribed, f"triggers without a description: {undescribed}"
    names = [t["name"] for t in found]
    assert len(names) == len(set(names)), f"trigger names used twice: {names}"
    assert {"retrain on drift", "retrain on degraded performance", "serve on registration",
            "roll out on registration"} <= set(names)


def test_no_module_spells_an_event_name_itself():
    """Every emit names its event through core.events: a literal would drift from the triggers."""
    spelled = []
    for package in ("core", "tasks", "flows", "serving", "monitoring", "compute", "devstack"):
        for path in (REPO / package).rglob("*.py"):
            if path == REPO / "core" / "events.py":
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in events.EVENTS:
                    spelled.append(f"{path.relative_to(REPO)}:{node.lineno} {node.value}")
    assert not spelled, spelled
