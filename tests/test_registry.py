"""The registry's alias history: rollbacks walk back through the champions, a move that cannot be
done changes nothing, and `python -m flows.registry` does the same from a terminal.

Everything runs against a real MLflow registry in a temporary SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.registry import CHALLENGER, CHAMPION, EVENT_PREFIX, ROLLBACK, Registry, RegistryError

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "ray", "great_expectations", "evidently", "mlflow", "bentoml", "pandas", "dask")


def registry_at(db: Path, actor: str = "tester") -> Registry:
    return Registry.for_uri(f"sqlite:///{db}", actor=actor)


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory) -> Path:
    """An MLflow database with its tables made (that costs seconds), for tests to copy."""
    db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    client = registry_at(db).client
    client.search_experiments()
    client.search_registered_models()
    return db


def mlflow_db(folder: Path, empty_mlflow_db: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(empty_mlflow_db, folder / "mlflow.db"))


@pytest.fixture
def registry(tmp_path: Path, empty_mlflow_db: Path) -> Registry:
    return registry_at(mlflow_db(tmp_path, empty_mlflow_db))


def champions_one_to(registry: Registry, name: str, count: int) -> None:
    """``count`` versions of ``name``; the champion moved 1 -> 2 -> ... -> count, as training
    registers a challenger and a person promotes it."""
    run = registry.client.create_run(registry.client.create_experiment(f"{name}-runs")).info.run_id
    registry.register(name, "file:///tmp/v1", run, {}, [CHALLENGER, CHAMPION], "first")
    for n in range(2, count + 1):
        version = registry.register(name, f"file:///tmp/v{n}", run, {}, [CHALLENGER], "trained")
        registry.promote(name, version.version, CHAMPION, "won the A/B test")


def state(registry: Registry, name: str) -> tuple:
    return registry.aliases(name), registry.history(name)


def test_two_rollbacks_go_back_two_champions_and_a_third_changes_nothing(registry):
    champions_one_to(registry, "m", 3)
    assert registry.aliases("m") == {CHALLENGER: "3", CHAMPION: "3"}

    first = registry.rollback("m", reason="p99 latency")
    assert (first.from_version, first.to_version, first.kind, first.reason) == ("3", "2", ROLLBACK, "p99 latency")
    assert registry.aliases("m")[CHAMPION] == "2"
    second = registry.rollback("m")
    assert (second.from_version, second.to_version, second.kind) == ("2", "1", ROLLBACK)
    assert registry.aliases("m") == {CHALLENGER: "3", CHAMPION: "1"}  # the challenger stays

    before = state(registry, "m")
    with pytest.raises(RegistryError, match="m@champion is version 1 and has no earlier version"):
        registry.rollback("m")
    assert state(registry, "m") == before
    assert registry.rollback_target("m", CHAMPION) is None


def test_a_promotion_after_rollbacks_starts_a_new_history_point(registry):
    champions_one_to(registry, "m", 3)
    registry.rollback("m")
    registry.rollback("m")
    registry.promote("m", "3", CHAMPION, "fixed and re-checked")
    assert registry.aliases("m")[CHAMPION] == "3"
    assert registry.rollback_target("m") == "1"  # back to where the promotion started from
    registry.rollback("m")
    assert registry.aliases("m")[CHAMPION] == "1"
    with pytest.raises(RegistryError, match="no earlier version"):
        registry.rollback("m")
    # The challenger has its own history: 1 -> 2 -> 3, so it walks back too.
    registry.rollback("m", CHALLENGER)
    assert registry.aliases("m") == {CHALLENGER: "2", CHAMPION: "1"}
    events = registry.history("m")
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert [(e.alias, e.from_version, e.to_version, e.kind) for e in events[6:]] == [
        (CHAMPION, "3", "2", ROLLBACK), (CHAMPION, "2", "1", ROLLBACK), (CHAMPION, "1", "3", "move"),
        (CHAMPION, "3", "1", ROLLBACK), (CHALLENGER, "3", "2", ROLLBACK)]


def test_promote_refuses_a_missing_version_a_no_op_and_an_unknown_model(registry):
    champions_one_to(registry, "m", 2)
    before = state(registry, "m")
    with pytest.raises(RegistryError, match=r"m has no version 9; its versions: 1, 2"):
        registry.promote("m", "9")
    with pytest.raises(RegistryError, match="m@champion is already version 2; nothing changed"):
        registry.promote("m", "2")
    with pytest.raises(RegistryError, match=r"no registered model 'mm' at sqlite:.*; registered: m"):
        registry.promote("mm", "1")
    with pytest.raises(RegistryError, match="no registered model 'mm'"):
        registry.rollback("mm")
    assert state(registry, "m") == before


def test_a_move_whose_event_cannot_be_written_is_put_back(registry, tmp_path):
    from mlflow import MlflowClient

    champions_one_to(registry, "m", 2)
    before = state(registry, "m")

    class TagsFail(MlflowClient):
        def set_registered_model_tag(self, name, key, value):
            raise RuntimeError("registry went away")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    failing = Registry(TagsFail(tracking_uri=uri, registry_uri=uri), actor="tester")
    with pytest.raises(RuntimeError, match="registry went away"):
        failing.rollback("m")
    with pytest.raises(RuntimeError, match="registry went away"):
        failing.promote("m", "1", CHALLENGER)
    assert state(registry, "m") == before


def test_history_written_before_rollbacks_were_marked_still_reads(registry):
    """Tags written before the ``kind`` field existed read as moves; unknown fields are ignored."""
    champions_one_to(registry, "m", 1)
    run = registry.client.create_run(registry.client.create_experiment("more")).info.run_id
    for source in ("file:///tmp/v2", "file:///tmp/v3"):
        registry.client.create_model_version("m", source, run_id=run)
    registry.client.set_registered_model_alias("m", CHAMPION, "3")
    for seq, (before, after) in enumerate([("1", "2"), ("2", "3")], start=3):
        old = {"seq": seq, "alias": CHAMPION, "from_version": before, "to_version": after,
               "actor": "someone", "at": "2025-01-01T00:00:00+00:00", "reason": "by hand"}
        if seq == 4:
            old["written_by"] = "a later version"
        registry.client.set_registered_model_tag("m", f"{EVENT_PREFIX}{seq:06d}", json.dumps(old))
    assert [e.kind for e in registry.history("m")] == ["move"] * 4
    registry.rollback("m")
    registry.rollback("m")
    assert registry.aliases("m")[CHAMPION] == "1"
    assert registry.history("m")[-1].seq == 6


def test_a_move_made_outside_the_registry_is_the_one_a_rollback_undoes(registry):
    """Someone moved the champion in the MLflow UI (no event); rollback undoes that first."""
    champions_one_to(registry, "m", 3)
    registry.client.set_registered_model_alias("m", CHAMPION, "1")
    assert registry.rollback_target("m") == "3"
    registry.rollback("m")
    assert registry.aliases("m")[CHAMPION] == "3"
    registry.rollback("m")
    assert registry.aliases("m")[CHAMPION] == "2"


def test_the_cli_takes_the_action_first_and_checks_the_version():
    from core.cli import parse
    from flows.registry import RegistryParams, cli_args

    params, overrides = parse(RegistryParams, cli_args(["promote", "--version", "3", "--home", "/tmp/h"]),
                              "registry")
    assert params == RegistryParams(action="promote", version=3)
    assert overrides["home"] == "/tmp/h"
    assert parse(RegistryParams, cli_args([]), "registry")[0].action == "history"
    for bad in (["promote"], ["rollback", "--version", "2"], ["rolback"], ["promote", "--version", "x"],
                ["rollback", "--alias", "champoin"]):
        with pytest.raises(SystemExit):
            parse(RegistryParams, cli_args(bad), "registry")


def test_help_imports_nothing_heavy():
    code = ("import sys, runpy; sys.argv=['x', '--help']\n"
            "try:\n    runpy.run_module('flows.registry', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=REPO).stdout
    assert "--version" in out and "--profile" in out and "rollback" in out
    assert "HEAVY []" in out


def test_the_light_reader_reads_what_mlflow_reads(registry, tmp_path):
    """``Registry.reader_for_uri`` (SQLite's tables, no MLflow import) gives the history,
    aliases and rollback targets MLflow's client gives, and the same refusals."""
    champions_one_to(registry, "m", 3)
    registry.rollback("m", reason="bad canary")
    reader = Registry.reader_for_uri(registry.client.tracking_uri)
    assert reader.client.__class__.__name__ == "ReadOnlyClient"
    assert reader.history("m") == registry.history("m") and len(reader.history("m")) == 7
    assert reader.aliases("m") == registry.aliases("m") == {CHALLENGER: "3", CHAMPION: "2"}
    assert [reader.rollback_target("m", a) for a in (CHAMPION, CHALLENGER)] == [
        registry.rollback_target("m", a) for a in (CHAMPION, CHALLENGER)]
    assert reader.history("nope") == [] and reader.aliases("nope") == {}
    with pytest.raises(RegistryError, match="no registered model 'nope' .* registered: m"):
        reader.require("nope")
    empty = Registry.reader_for_uri(f"sqlite:///{tmp_path / 'none.db'}")
    with pytest.raises(RegistryError, match="registered: none"):
        empty.require("m")


def test_history_answers_without_prefect_or_mlflow(tmp_path, empty_mlflow_db):
    """``python -m flows.registry history`` is read-only: no flow run, no temporary Prefect
    server, neither Prefect nor MLflow imported (issue 20: 11 s before, under 2 s goal)."""
    home = tmp_path / "home"
    champions_one_to(registry_at(mlflow_db(home, empty_mlflow_db)), "flywheel-flights", 2)
    # -X importtime lists every module imported, on stderr
    run = subprocess.run([sys.executable, "-X", "importtime", "-m", "flows.registry", "history", "--home", str(home)],
                         capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ, "COLUMNS": "200"})
    out = run.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time:")}
    assert "aliases now: challenger = version 2, champion = version 2" in out, out + run.stderr[-2000:]
    assert "a rollback of champion would go to version 1" in out
    assert "core.registry" in imported and not imported & {*HEAVY, "prefect"}


def test_the_flow_emits_an_event_for_each_move(home, prefect_harness, monkeypatch):
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from flows.registry import RegistryParams, model_name_for, registry

    worker = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: worker)
    name = model_name_for("flights")
    champions_one_to(Registry.for_uri(home.tracking_uri), name, 2)

    rolled_back = registry(RegistryParams(action="rollback", reason="canary errors"))
    promoted = registry(RegistryParams(action="promote", version=2))
    shown = registry(RegistryParams())

    assert (rolled_back.moved.to_version, promoted.moved.to_version) == ("1", "2")
    assert shown.moved is None and shown.aliases == {CHALLENGER: "2", CHAMPION: "2"}
    assert shown.rollback_targets == {CHALLENGER: "1", CHAMPION: "1"}
    assert [e.kind for e in shown.history[-2:]] == [ROLLBACK, "move"]
    worker.drain()
    assert isinstance(worker._client, AssertingEventsClient)
    ours = [e for e in worker._client.events if e.event.startswith("flywheel.model.")]
    assert [e.event for e in ours] == ["flywheel.model.rolled_back", "flywheel.model.promoted"]
    assert {e.resource.id for e in ours} == {f"flywheel.model.{name}"}
    assert ours[0].payload["reason"] == "canary errors" and ours[1].payload["to_version"] == "2"


def _cli(home: Path, *args: str) -> subprocess.Popen:
    # A wide "terminal", so rich does not wrap the reasons this test looks for.
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
    return subprocess.Popen([sys.executable, "-m", "flows.registry", *args, "--home", str(home)], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    output = proc.communicate(timeout=300)[0]
    return proc.returncode, output


@pytest.mark.slow
def test_a_person_rolls_back_twice_and_promotes_from_the_command_line(tmp_path, empty_mlflow_db):
    """The CLI end to end, each command in its own process with its own temporary Prefect API.
    The failing commands run beside the sequence, on their own home."""
    homes = {"main": tmp_path / "main", "failing": tmp_path / "failing"}
    for home in homes.values():
        champions_one_to(registry_at(mlflow_db(home, empty_mlflow_db), actor="setup"), "flywheel-flights", 3)
    registry_at(homes["failing"] / "mlflow.db").rollback("flywheel-flights")
    registry_at(homes["failing"] / "mlflow.db").rollback("flywheel-flights")
    failing_before = state(registry_at(homes["failing"] / "mlflow.db"), "flywheel-flights")
    failing = [_cli(homes["failing"], "rollback"), _cli(homes["failing"], "promote", "--version", "9")]

    code, history = _finish(_cli(homes["main"], "history"))
    assert code == 0, history[-3000:]
    assert "alias history of flywheel-flights" in history
    assert "2 -> 3" in history and "won the A/B test" in history
    assert "aliases now: challenger = version 3, champion = version 3" in history
    assert "a rollback of champion would go to version 2" in history

    for expected in ("version 3 -> 2 (rollback: bad canary)", "version 2 -> 1 (rollback)"):
        code, output = _finish(_cli(homes["main"], "rollback", *(["--reason", "bad canary"]
                                                                if "canary" in expected else [])))
        assert code == 0 and f"flywheel-flights@champion: {expected}" in output, output[-3000:]
    code, output = _finish(_cli(homes["main"], "promote", "--version", "3", "--reason", "fixed"))
    assert code == 0 and "flywheel-flights@champion: version 1 -> 3 (fixed)" in output, output[-3000:]
    main = registry_at(homes["main"] / "mlflow.db")
    assert main.aliases("flywheel-flights") == {CHALLENGER: "3", CHAMPION: "3"}
    assert [(e.from_version, e.to_version, e.kind) for e in main.history("flywheel-flights")[-3:]] == [
        ("3", "2", ROLLBACK), ("2", "1", ROLLBACK), ("1", "3", "move")]

    expected_lines = ["python -m flows.registry failed: flywheel-flights@champion is version 1 and has "
                      "no earlier version to roll back to",
                      "python -m flows.registry failed: flywheel-flights has no version 9; its versions: "
                      "1, 2, 3"]
    for proc, line in zip(failing, expected_lines, strict=True):
        code, output = _finish(proc)
        assert code == 1, output[-3000:]
        assert "Traceback" not in output
        assert line in output.splitlines()  # the whole message, on a line of its own
    assert state(registry_at(homes["failing"] / "mlflow.db"), "flywheel-flights") == failing_before


def test_an_allocation_is_read_by_the_light_reader_and_only_for_its_challenger(registry):
    """The share a rollout or the bandit sets is a tag every service worker reads with the
    aliases; it applies to the challenger it was made for, not to the next one."""
    from core.allocation import ALLOCATION_TAG, Allocation, effective_share

    champions_one_to(registry, "m", 2)
    registry.register("m", "file:///tmp/v3", registry.client.get_model_version("m", "2").run_id, {}, [CHALLENGER],
                      "trained")
    registry.set_allocation("m", Allocation(0.25, "3", "rollout", "step 2 of 4"))
    reader = Registry.reader_for_uri(registry.client.tracking_uri)
    tags = reader.tags("m")
    assert Allocation.from_tag(tags[ALLOCATION_TAG]).share == 0.25
    assert effective_share(tags, "3", 0.1) == (0.25, "rollout")
    assert effective_share(tags, "4", 0.1) == (0.1, "configured")  # made for v3, not v4
    assert effective_share(tags, None, 0.1) == (0.0, "no challenger")
    registry.client.set_registered_model_tag("m", ALLOCATION_TAG, "{not json")  # edited by hand in the MLflow UI
    assert effective_share(reader.tags("m"), "3", 0.1) == (0.1, "configured")
    with pytest.raises(RegistryError):
        registry.set_allocation("nope", Allocation(0.5, "1", "manual", "x"))
    # A move that takes v3 out of the test drops its share: back as challenger later, it starts afresh.
    registry.set_allocation("m", Allocation(1.0, "3", "rollout", "step 3 of 3"))
    registry.move_alias("m", CHAMPION, "3", "promoted")
    assert ALLOCATION_TAG not in reader.tags("m")
    registry.move_alias("m", CHALLENGER, "2", "back under test")
    registry.set_allocation("m", Allocation(0.3, "2", "thompson", "bandit"))
    registry.move_alias("m", CHAMPION, "3", "the same champion again")  # v2 still under test: kept
    assert effective_share(reader.tags("m"), "2", 0.1) == (0.3, "thompson")
