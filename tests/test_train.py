"""Training: model format and integrity, the registry's all-or-nothing moves, Ray Train fault
tolerance, and the train flow end to end (register, reproduce, fail cleanly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.registry import CHALLENGER, CHAMPION, Registry, RegistryError


def tiny_spec():
    from core.model import ModelSpec

    return ModelSpec(task="classification", categorical=["a"], numeric=["x"], cardinalities=[3],
                     width=4, depth=1, dropout=0.0, embedding_dim=2)


def test_model_round_trip_and_tampered_weights_are_refused(tmp_path: Path):
    import torch

    from core.model import (
        WEIGHTS_FILE,
        ModelIntegrityError,
        TabularNet,
        load_model,
        predict,
        save_model,
    )

    torch.manual_seed(0)
    model = TabularNet(tiny_spec())
    sha = save_model(model, tmp_path, "{}")
    cat, num = np.array([[0], [1], [2]]), np.array([[0.1], [0.2], [0.3]], dtype=np.float32)
    loaded = load_model(tmp_path, sha)
    np.testing.assert_allclose(predict(loaded, cat, num), predict(model, cat, num))
    data = bytearray((tmp_path / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match"):
        load_model(tmp_path, sha)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry.for_uri(f"sqlite:///{tmp_path / 'mlflow.db'}", actor="tester")


def _run_id(registry: Registry) -> str:
    experiment = registry.client.create_experiment("e")
    return registry.client.create_run(experiment).info.run_id


def test_alias_moves_are_recorded_and_rollback_restores_the_previous_champion(registry):
    run = _run_id(registry)
    v1 = registry.register("m", "file:///tmp/a", run, {}, [CHALLENGER, CHAMPION], "first")
    v2 = registry.register("m", "file:///tmp/b", run, {}, [CHALLENGER], "second")
    registry.move_alias("m", CHAMPION, v2.version, "won the A/B test")
    assert registry.aliases("m") == {CHALLENGER: "2", CHAMPION: "2"}
    history = registry.history("m")
    assert [(e.alias, e.from_version, e.to_version) for e in history] == [
        (CHALLENGER, None, "1"), (CHAMPION, None, "1"), (CHALLENGER, "1", "2"), (CHAMPION, "1", "2")]
    assert history[-1].actor == "tester" and history[-1].reason == "won the A/B test"
    registry.rollback("m")
    assert registry.aliases("m")[CHAMPION] == str(v1.version)
    assert registry.history("m")[-1].reason == "rollback"


def test_a_failed_registration_leaves_the_registry_as_it_was(registry, tmp_path):
    from mlflow import MlflowClient

    run = _run_id(registry)
    registry.register("m", "file:///tmp/a", run, {}, [CHALLENGER, CHAMPION], "first")
    before = (registry.aliases("m"), registry.history("m"),
              [v.version for v in registry.client.search_model_versions("name='m'")])

    class FailsOnChampion(MlflowClient):
        def set_registered_model_alias(self, name, alias, version):
            if alias == CHAMPION:
                raise RuntimeError("registry went away")
            super().set_registered_model_alias(name, alias, version)

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    failing = Registry(FailsOnChampion(tracking_uri=uri, registry_uri=uri), actor="tester")
    with pytest.raises(RegistryError, match="failed and was undone: registry went away"):
        failing.register("m", "file:///tmp/b", run, {}, [CHALLENGER, CHAMPION], "second")
    after = (registry.aliases("m"), registry.history("m"),
             [v.version for v in registry.client.search_model_versions("name='m'")])
    assert after == before


def category_data(n: int = 600) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A label that is one category of a three-valued feature: learnable in a few epochs."""
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 3, size=(n, 1))
    num = rng.normal(size=(n, 1)).astype(np.float32)
    return cat, num, (cat[:, 0] == 1).astype(np.float32)


def test_one_training_config_from_the_flow_parameters_to_the_worker():
    """Settings give the budget, --smoke-test its own, explicit flags win; use_gpu travels."""
    from core.settings import TrainSettings
    from core.training import HYPERPARAMETERS, Hyperparameters, TrainingConfig
    from flows.train import TrainParams

    settings = TrainSettings(trials=4, max_epochs=5, grace_period=3, num_workers=2, seed=7)
    assert TrainParams().training(settings) == TrainingConfig(
        trials=4, max_epochs=5, grace_period=3, num_workers=2, max_failures=2, seed=7)
    smoke = TrainParams(smoke_test=True, trials=3, use_gpu=True).training(settings)
    assert (smoke.trials, smoke.max_epochs, smoke.grace_period, smoke.num_workers, smoke.use_gpu) == (3, 2, 2, 1, True)
    assert TrainParams(num_workers=3).training(settings).num_workers == 3
    # Unknown or out-of-range values are refused where they enter, not deep in a worker.
    with pytest.raises(ValueError, match="max_epochs"):
        TrainingConfig(trials=1, max_epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        Hyperparameters.model_validate({k: 1 for k in HYPERPARAMETERS} | {"dropout": 0.0, "momentum": 0.9})


def test_a_version_not_registered_by_the_train_flow_cannot_be_reproduced(registry):
    from core.errors import FlywheelError
    from tasks.registry import recorded_training

    registry.register("m", "file:///tmp/a", _run_id(registry), {}, [CHAMPION], "by hand")
    with pytest.raises(FlywheelError, match="no recorded flywheel.hyperparameters"):
        recorded_training(registry, "m", "1")
    with pytest.raises(FlywheelError, match="no registered version 7 of m"):
        recorded_training(registry, "m", "7")


def test_a_killed_worker_resumes_from_its_checkpoint_with_no_epoch_missing_or_repeated(tmp_path):
    import ray

    from compute.ray_session import ray_session
    from compute.train import fit
    from core.settings import RaySettings
    from core.training import FaultInjection, Hyperparameters, LoopConfig, TrainingConfig

    cat, num, y = category_data()
    with ray_session(RaySettings(num_cpus=2)):
        data_ref = ray.put({"train": (cat, num, y), "validation": (cat[:100], num[:100], y[:100])})
        spec = tiny_spec().model_dump(include={"task", "categorical", "numeric", "cardinalities"})
        training = TrainingConfig(trials=1, max_epochs=4, num_workers=2, max_failures=2, seed=1,
                                  fault=FaultInjection(at_epoch=2, marker=str(tmp_path / "failed-once")))
        result = fit(LoopConfig(training=training, data_spec=spec, epochs=4), "tabular_net",
                     Hyperparameters(lr=0.01, width=4, depth=1, dropout=0.0, embedding_dim=2, batch_size=64,
                                     weight_decay=0.0).model_dump(),
                     data_ref, storage_path=str(tmp_path / "ray"), name="resume")
    assert (tmp_path / "failed-once").exists(), "the worker was not killed"
    assert result.error is None
    assert [int(row["epoch"]) for row in result.history] == [0, 1, 2, 3]
    assert result.checkpoint_path is not None


def test_a_killed_in_process_trial_resumes_from_its_checkpoint(tmp_path):
    """One worker: the trial trains in its own process. Killed at epoch 2, Tune restarts it
    from its epoch-1 checkpoint: every epoch is reported once, none repeated."""
    import ray

    from compute.ray_session import ray_session
    from compute.train import FamilyPlan, tune_model
    from core.settings import RaySettings
    from core.training import FaultInjection, TrainingConfig

    cat, num, y = category_data()
    with ray_session(RaySettings(num_cpus=2)):
        data_ref = ray.put({"train": (cat, num, y), "validation": (cat[:100], num[:100], y[:100]),
                            "wide_init": None})
        spec = tiny_spec().model_dump(include={"task", "categorical", "numeric", "cardinalities"})
        hyperparameters = {"lr": 0.002, "width": 4, "depth": 1, "dropout": 0.0, "embedding_dim": 2,
                           "batch_size": 64, "weight_decay": 1e-5}
        training = TrainingConfig(trials=1, max_epochs=4, grace_period=4, num_workers=1, max_failures=2, seed=1,
                                  fault=FaultInjection(at_epoch=2, marker=str(tmp_path / "failed-once")))
        outcome = tune_model(training, spec, data_ref, [FamilyPlan("tabular_net", [hyperparameters])],
                             storage_path=str(tmp_path / "ray"), name="resume-in-process")
    assert (tmp_path / "failed-once").exists(), "the trial was not killed"
    assert [int(row["epoch"]) for row in outcome.best.history] == [0, 1, 2, 3]
    assert all(row["checkpoint_path"] for row in outcome.best.history)


@pytest.mark.slow
def test_train_flow_registers_a_champion_with_lineage_and_reproduces_it(fast_training, prefect_harness,
                                                                         monkeypatch):
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from core.settings import configure
    from flows.train import TrainParams, train
    from tests.conftest import ALL_FAMILIES

    configure(home=str(fast_training.home), datasets_dir=str(fast_training.datasets_dir),
              train={**fast_training.train.model_dump(exclude={"families"}), "families": ALL_FAMILIES})
    events = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: events)
    result = train(TrainParams(dataset="interaction"))
    # Every family competed; a logistic model on one-hot columns cannot learn an XOR, so it lost.
    assert set(result.families) == {"linear", "gbdt", "tabular_net"}
    assert result.family != "linear" and result.metrics == {k: v for k, v in result.families[result.family].items()
                                                             if k != "val_loss"}
    assert result.metrics["roc_auc"] > 0.85 > result.families["linear"]["roc_auc"]
    assert result.registered_version == "1" and result.aliases == [CHALLENGER, CHAMPION]
    registry = Registry.for_uri(fast_training.tracking_uri)
    assert registry.aliases(result.model_name) == {CHALLENGER: "1", CHAMPION: "1"}
    tags = registry.client.get_model_version(result.model_name, "1").tags
    for key in ("git_commit", "raw_tables", "feature_version", "feature_stats_sha256", "hyperparameters",
                "metrics", "prefect_flow_run_id", "weights_sha256", "seed", "training", "family", "competition",
                "family_metrics"):
        assert tags[f"flywheel.{key}"], key
    # The training config recorded is the one the run used (and the reproduce path reads).
    assert json.loads(tags["flywheel.training"]) == result.training.model_dump(exclude={"fault", "use_gpu"})
    assert json.loads(tags["flywheel.raw_tables"])["events"]["version"] == 1  # 0 is the empty creation
    assert tags["flywheel.family"] == result.family
    assert tags["flywheel.competition"].startswith(f"winner {result.family} (validation loss ")
    # One parent run naming the winner, one child run per trial (one trial per family here).
    runs = registry.client.search_runs([registry.client.get_experiment_by_name(result.model_name).experiment_id])
    parent = next(r for r in runs if r.info.run_id == result.mlflow_run_id)
    assert parent.data.tags["flywheel.family"] == result.family
    assert {f"{f}_test_roc_auc" for f in result.families} <= set(parent.data.metrics)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.mlflow_run_id]
    assert sorted(c.data.tags["flywheel.family"] for c in children) == ["gbdt", "linear", "tabular_net"]
    assert all(c.data.metrics for c in children)

    assert json.loads(tags["flywheel.decision"])[-1] == "no champion yet: nothing to compare with"

    second = train(TrainParams(dataset="interaction"))
    assert second.champion is not None and second.champion["name"] == "champion v1"
    # The same data and seed: the same model, so it is not worse than the champion. The decision
    # lists the competition, the prior baseline and the champion, and is kept on the new version.
    assert len(second.decision) == 3 and "not clearly worse than the champion" in second.decision[2]
    assert "difference +0.0000" in second.decision[2], second.decision
    # Found: two runs on the same data, features and seed differed (test ROC AUC 0.7035 and
    # 0.7020). Now every family's every metric is the same, to the last digit.
    assert second.families == result.families, (second.families, result.families)
    assert registry.aliases(result.model_name) == {CHALLENGER: second.registered_version, CHAMPION: "1"}
    second_tags = registry.client.get_model_version(result.model_name, second.registered_version).tags
    assert json.loads(second_tags["flywheel.decision"]) == second.decision
    events.drain()
    assert isinstance(events._client, AssertingEventsClient)
    registered = [e for e in events._client.events if e.event == "flywheel.model.registered"]
    assert [e.payload["version"] for e in registered] == ["1", second.registered_version]
    assert {e.resource.id for e in registered} == {f"flywheel.model.{result.model_name}"}
    # In the Prefect UI the run shows each step as its own task run (task runs reach the API as
    # events, which this test captures).
    flow_run = f"prefect.flow-run.{tags['flywheel.prefect_flow_run_id']}"
    steps = {e.resource["prefect.resource.name"].rsplit("-", 1)[0] for e in events._client.events
             if e.event == "prefect.task-run.Completed" and any(r.id == flow_run for r in e.related)}
    assert {"load training data", "fit linear start", "tune", "log trials to MLflow", "export model",
            "load champion", "evaluate", "plot evaluation", "log training to MLflow", "register model",
            "announce registered model"} <= steps, steps

    repro = train(TrainParams(dataset="interaction", reproduce="1"))
    assert repro.reproduced["max_abs_diff"] == 0.0, repro.reproduced  # exact
    assert repro.training.seed == result.training.seed and repro.training.num_workers == 1
    assert repro.best_trial == json.loads(tags["flywheel.hyperparameters"])


@pytest.mark.slow
def test_a_run_that_fails_leaves_registry_and_aliases_as_they_were(fast_training, prefect_harness):
    from core.model import ModelIntegrityError
    from flows.train import TrainParams, train

    first = train(TrainParams(dataset="interaction"))
    registry = Registry.for_uri(fast_training.tracking_uri)
    before = (registry.aliases(first.model_name), registry.history(first.model_name))
    # Tamper with the champion's stored weights: the next run must refuse to load it and fail.
    source = registry.client.get_model_version(first.model_name, "1").source
    weights = Path(source.removeprefix("file://")) / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    with pytest.raises(ModelIntegrityError):
        train(TrainParams(dataset="interaction"))
    assert (registry.aliases(first.model_name), registry.history(first.model_name)) == before
    assert len(registry.client.search_model_versions(f"name='{first.model_name}'")) == 1


@pytest.mark.slow
def test_stopping_a_cluster_leaves_every_other_ray_running():
    """Found: stop ran `ray stop --force`, which ended every Ray process of the user; a cluster
    test's teardown killed the Ray of a demo running beside it."""
    from compute import ray_cluster

    first = ray_cluster.start(nodes=1, cpus_per_node=1)
    second = ray_cluster.start(nodes=1, cpus_per_node=1)
    try:
        records = [json.loads(record.read_text()) for record in ray_cluster._state_dir().glob("*.json")]
        groups = {record["address"]: set(record["groups"]) for record in records}
        assert ray_cluster._group_members(groups[first]) and ray_cluster._group_members(groups[second])
        assert ray_cluster.stop(first) == [first]
        assert not ray_cluster._group_members(groups[first])
        alive = ray_cluster._group_members(groups[second])
        assert any("raylet" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                   for pid in alive), "the other cluster's raylet was stopped too"
    finally:
        ray_cluster.stop(second)
    assert not ray_cluster._group_members(groups[second])


@pytest.mark.slow
def test_interrupted_training_reruns_without_redoing_data_work_or_half_registering(
        fast_training, interaction_dataset, tmp_path):
    """Ctrl-C during tuning, then the same command again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "FLYWHEEL_HOME": str(fast_training.home),
           "FLYWHEEL_DATASETS_DIR": str(interaction_dataset),
           "FLYWHEEL_TRAIN": fast_training.train.model_dump_json(), "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "flows.train", "--dataset", "interaction"]
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300
        while "tuning:" not in log.read_text() and first.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        assert "tuning:" in log.read_text(), log.read_text()[-3000:]
        time.sleep(3)
        os.killpg(first.pid, signal.SIGINT)
        first.wait(timeout=180)
    assert first.returncode != 0
    registry = Registry.for_uri(fast_training.tracking_uri)
    name = "flywheel-interaction"
    assert registry.aliases(name) == {}
    assert not registry.exists(name) or not registry.client.search_model_versions(f"name='{name}'")

    second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    output = second.stdout + second.stderr
    assert second.returncode == 0, output[-3000:]
    # The first run got as far as tuning: its feature table is reused, no data work is redone.
    assert "Beginning subflow run" not in output, "ingest or ETL ran again"
    assert "training data: feature table version 0" in output
    assert registry.aliases(name) == {CHALLENGER: "1", CHAMPION: "1"}


@pytest.mark.slow
def test_a_regression_dataset_trains_end_to_end_from_its_contract(home, prefect_harness, diabetes_dataset):
    """scikit-learn's diabetes data, onboarded by a contract alone, through ingest, ETL,
    tuning, evaluation against the mean and a linear model, and the registration gate."""
    from core.settings import configure
    from flows.train import TrainParams, train

    configure(home=str(home.home), datasets_dir=str(diabetes_dataset), train={
        "trials": 2, "max_epochs": 4, "grace_period": 1, "num_workers": 1,
        "search_space": {"lr": [0.01, 0.03], "width": [16], "depth": [1], "dropout": [0.0],
                         "embedding_dim": [2], "batch_size": [32], "weight_decay": [1e-6, 1e-5]}})
    result = train(TrainParams(dataset="diabetes", should_register=False))
    assert set(result.metrics) >= {"mae", "rmse", "r2"}
    assert set(result.baselines) == {"prior"} and set(result.families) == {"linear", "gbdt", "tabular_net"}
    assert result.families["linear"]["rmse"] < result.baselines["prior"]["rmse"]  # the data has signal
    assert 20 < result.metrics["rmse"] < 120  # progression spans 25..346; a model, not noise
    assert result.decision[0].startswith(f"winner {result.family} ")
    assert result.decision[1].startswith("rmse ") and result.registered_version is None


@pytest.mark.slow
def test_a_champion_fitted_on_other_feature_statistics_is_scored_with_its_own(fast_training, prefect_harness):
    """New data changes the feature statistics (here the category vocabulary's order). The
    champion must be scored on the same test rows encoded with the statistics it was trained
    with; encoded with the new ones its categories would swap and its AUC collapse."""
    import os

    import pandas as pd

    from core.features import FeatureStats
    from core.lake import Lake
    from flows.train import TrainParams, train

    first = train(TrainParams(dataset="interaction"))
    assert first.registered_version == "1"
    registry = Registry.for_uri(fast_training.tracking_uri)
    tags = registry.client.get_model_version(first.model_name, "1").tags
    lake = Lake(fast_training.lake)
    stats = FeatureStats.from_json(lake.commit_metadata(lake.uri("features", "interaction"),
                                                        int(tags["flywheel.feature_version"]))["flywheel.feature_stats"])
    rare = stats.vocabularies["a"][-1]  # the less frequent value of 'a': make it the most frequent
    csv = os.environ["INTERACTION_CSV"]
    events = pd.read_csv(csv)
    rng = np.random.default_rng(1)
    n = 4000
    b = rng.choice(["u", "v"], n)
    grown = pd.DataFrame({
        "row_id": np.arange(len(events) + 1, len(events) + n + 1),
        "at": pd.date_range(pd.Timestamp(events["at"].max()) + pd.Timedelta(hours=1), periods=n, freq="h"),
        "a": rare, "b": b, "noise": rng.normal(size=n),
        "outcome": ((rare == "x") ^ (b == "u")).astype(float)})
    pd.concat([events, grown.astype({"at": str})], ignore_index=True).to_csv(csv, index=False)

    second = train(TrainParams(dataset="interaction", refresh_data=True))
    new_stats = FeatureStats.from_json(lake.commit_metadata(lake.uri("features", "interaction"),
                                                            second.feature_version)["flywheel.feature_stats"])
    assert new_stats.vocabularies["a"][0] == rare != stats.vocabularies["a"][0]  # the codes changed
    assert second.champion is not None and second.champion["name"] == "champion v1"
    assert second.champion["roc_auc"] > 0.85  # scored with its own vocabulary: still right
