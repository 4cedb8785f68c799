"""Model families: each one's safe format, a user's own family plugged in by dotted path, and
the competition on Ray Tune picking the family that must win on data made for it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest

from core.families import (
    FitData,
    Fitted,
    ModelFamily,
    ModelIntegrityError,
    load_fitted,
    resolve,
    save_fitted,
    validation_metrics,
)

# --------------------------------------------------------------------------- a user's own family


class CategoryRateFamily(ModelFamily):
    """A user's family, defined only here: the training rate of the first categorical's value
    (smoothed toward the overall rate by ``prior_weight``), stored as JSON."""

    name: ClassVar[str] = "category_rate"
    weights_file: ClassVar[str] = "rates.json"

    def default_space(self) -> dict[str, Any]:
        return {"prior_weight": [1.0, 10.0]}

    def fit(self, data: FitData, hyperparameters: dict[str, Any], session: Any) -> None:
        import tempfile

        cat, _, y = data.train
        overall = float(y.mean())
        weight = float(hyperparameters["prior_weight"])
        size = data.data_spec["cardinalities"][0]
        sums = np.bincount(cat[:, 0], weights=y, minlength=size)
        counts = np.bincount(cat[:, 0], minlength=size)
        rates = ((sums + weight * overall) / (counts + weight)).tolist()
        v_cat, v_num, v_y = data.validation
        for iteration in range(session.iterations):
            session.before_iteration(iteration)
            metrics = {"epoch": iteration, **validation_metrics(data.task, v_y, self.predict(rates, v_cat, v_num))}
            with tempfile.TemporaryDirectory() as folder:
                self.save(rates, Path(folder))
                session.report(metrics, Path(folder))

    def from_checkpoint(self, data_spec, hyperparameters, folder):  # noqa: ANN001, ANN201
        return self.load(folder, data_spec)

    def predict(self, model, categorical, numeric):  # noqa: ANN001, ANN201
        return np.asarray(model)[categorical[:, 0]]

    def save(self, model, folder):  # noqa: ANN001, ANN201
        (folder / self.weights_file).write_text(json.dumps(model))

    def load(self, folder, spec):  # noqa: ANN001, ANN201
        return json.loads((folder / self.weights_file).read_text())


PLUGIN = "tests.test_families:CategoryRateFamily"


# --------------------------------------------------------------------------- without Ray


class PlainSession:
    """A ``FitSession`` with no Ray: keeps every report's checkpoint folder."""

    def __init__(self, folder: Path, iterations: int, seed: int = 3):
        self.rank, self.world, self.iterations, self.threads, self.seed = 0, 1, iterations, 1, seed
        self.folder, self.reports = folder, []
        folder.mkdir(parents=True, exist_ok=True)

    def report(self, metrics, folder):  # noqa: ANN001, ANN201
        import shutil

        kept = self.folder / f"checkpoint_{len(self.reports)}"
        shutil.copytree(folder, kept)
        self.reports.append((metrics, kept))

    def resume_from(self):  # noqa: ANN201
        return None

    def before_iteration(self, iteration):  # noqa: ANN001, ANN201
        return None


def tiny_data(n: int = 800) -> FitData:
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 3, size=(n, 2))
    num = rng.normal(size=(n, 2)).astype(np.float32)
    y = ((cat[:, 0] == 1) | (num[:, 0] > 1)).astype(np.float32)
    spec = {"task": "classification", "categorical": ["a", "b"], "numeric": ["x", "z"], "cardinalities": [3, 3],
            "output_bias": 0.0}
    cut = int(n * 0.75)
    return FitData(spec, (cat[:cut], num[:cut], y[:cut]), (cat[cut:], num[cut:], y[cut:]))


HYPERPARAMETERS = {
    "linear": {"strength": 1.0},
    "gbdt": {"learning_rate": 0.1, "num_leaves": 7, "min_data_in_leaf": 10, "rounds_per_iteration": 10},
    "tabular_net": {"lr": 0.02, "width": 8, "depth": 1, "dropout": 0.0, "embedding_dim": 2, "batch_size": 64,
                    "weight_decay": 1e-5},
    PLUGIN: {"prior_weight": 1.0},
}


@pytest.mark.parametrize("name", list(HYPERPARAMETERS))
def test_every_family_fits_saves_safely_and_loads_to_the_same_scores(name, tmp_path):
    family = resolve(name)
    data = tiny_data()
    session = PlainSession(tmp_path, iterations=2)
    family.fit(data, HYPERPARAMETERS[name], session)
    assert session.reports and all("val_loss" in m and "val_auc" in m for m, _ in session.reports)
    metrics, checkpoint = min(session.reports, key=lambda r: r[0]["val_loss"])
    model = family.from_checkpoint(data.data_spec, HYPERPARAMETERS[name], checkpoint)
    fitted = Fitted(family, model, family.model_spec(data.data_spec, HYPERPARAMETERS[name]))
    cat, num, y = data.validation
    scores = fitted.predict(cat, num)
    assert scores.shape == (len(y),) and np.all((scores >= 0) & (scores <= 1))
    assert validation_metrics("classification", y, scores)["val_loss"] == pytest.approx(metrics["val_loss"], rel=1e-4)

    folder = tmp_path / "saved"
    sha = save_fitted(fitted, folder, "{}")
    spec = json.loads((folder / "model_spec.json").read_text())
    assert spec["family"] == family.name and spec["weights_file"] == family.weights_file
    for path in folder.iterdir():  # never a pickle (protocol 2+ starts with 0x80)
        assert not path.read_bytes().startswith(b"\x80"), path
    loaded = load_fitted(folder, sha)
    assert type(loaded.family) is type(family)
    np.testing.assert_allclose(loaded.predict(cat, num), scores, rtol=1e-6)
    weights = folder / family.weights_file
    weights.write_bytes(weights.read_bytes()[:-2] + b"\x00\x00")
    with pytest.raises(ModelIntegrityError, match="does not match"):
        load_fitted(folder, sha)


def test_an_unknown_family_or_wrong_hyperparameters_are_named():
    from core.families import FamilyError

    with pytest.raises(FamilyError, match="cannot import 'no_such_module'"):
        resolve("no_such_module:Family")
    with pytest.raises(FamilyError, match="not a ModelFamily subclass"):
        resolve("tests.test_families:tiny_data")
    with pytest.raises(FamilyError, match="not a built-in"):
        resolve("xgboost")
    with pytest.raises(FamilyError, match=r"unknown \['depth'\]"):
        resolve("gbdt").validate({"depth": 3})
    with pytest.raises(FamilyError, match="tabular_net hyperparameters"):
        resolve("tabular_net").validate({"lr": 0.1})


def test_the_same_seed_samples_the_same_trials_for_every_family():
    from compute.train import plan

    families = [("gbdt", resolve("gbdt").default_space(), 3), ("tabular_net", resolve("tabular_net").default_space(), 4),
                ("linear", {"strength": {"loguniform": [0.1, 10.0]}}, 2)]
    first, again, other = plan(families, 13), plan(families, 13), plan(families, 14)
    assert [p.configs for p in first] == [p.configs for p in again]
    assert [p.configs for p in first] != [p.configs for p in other]
    assert [len(p.configs) for p in first] == [3, 4, 2]
    assert 0.1 <= first[2].configs[0]["strength"] <= 10.0


# --------------------------------------------------------------------------- the competition


def _made_for(winner: str, n: int = 3000) -> tuple[dict[str, Any], dict[str, Any]]:
    """Data on which ``winner`` must win, in time order (validation after training):

    - ``gbdt``: the label is an XOR of two numerics' signs. A linear model cannot represent it,
      and the network sees numerics only in its linear (wide) part; trees split on both.
    - ``tabular_net``: the label is an XOR of two categoricals plus a numeric trend that
      grows over time, so validation values lie beyond the training range. The linear model
      cannot represent the XOR; trees cannot extrapolate the trend; the network does both.
    - ``linear``: the label follows a trend alone (two categoricals are noise). Trees cannot
      extrapolate the trend; the network starts from the linear fit, and its training only adds
      noise to it.
    """
    rng = np.random.default_rng({"gbdt": 1, "tabular_net": 2, "linear": 3}[winner])
    trend = np.linspace(-2, 3, n).astype(np.float32) + rng.normal(0, 0.3, n).astype(np.float32)
    if winner == "gbdt":
        num = rng.normal(size=(n, 2)).astype(np.float32)
        cat = rng.integers(1, 3, size=(n, 1))
        logit = np.where((num[:, 0] > 0) ^ (num[:, 1] > 0), 2.5, -2.5)
    elif winner == "tabular_net":
        cat = rng.integers(1, 3, size=(n, 2))
        num = trend[:, None]
        logit = 2.0 * trend + np.where((cat[:, 0] == 1) ^ (cat[:, 1] == 1), 2.5, -2.5)
    else:
        # Validation's trend (0.5 to 2) lies beyond training's, where the probability still
        # climbs: trees hold the last training value; the linear model's fit is the optimum
        # the network's SGD can only come near.
        cat = rng.integers(1, 5, size=(n, 2))
        num = (np.linspace(-3, 2, n) + rng.normal(0, 0.3, n)).astype(np.float32)[:, None]
        logit = 2.0 * num[:, 0]
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)
    cut = int(n * 0.7)
    spec = {"task": "classification", "categorical": [f"c{i}" for i in range(cat.shape[1])],
            "numeric": [f"x{i}" for i in range(num.shape[1])], "cardinalities": [int(cat.max()) + 1] * cat.shape[1],
            "output_bias": 0.0}
    payload = {"train": (cat[:cut], num[:cut], y[:cut]), "validation": (cat[cut:], num[cut:], y[cut:])}
    return spec, payload


def test_on_data_made_for_each_family_that_family_wins_the_competition(tmp_path):
    """One Ray Tune run per dataset, with every built-in family and a user's own competing."""
    from compute.ray_session import ray_session
    from compute.train import plan, share, tune_model
    from core.families.linear import fit_weights
    from core.settings import RaySettings
    from core.training import TrainingConfig

    spaces = [("linear", {"strength": [1.0]}, 1),
              ("gbdt", {"learning_rate": [0.1], "num_leaves": [15], "min_data_in_leaf": [20],
                        "rounds_per_iteration": [25]}, 1),
              ("tabular_net", {"lr": [0.01], "width": [32], "depth": [1], "dropout": [0.0], "embedding_dim": [4],
                               "batch_size": [128], "weight_decay": [1e-5]}, 1),
              (PLUGIN, {"prior_weight": [1.0]}, 1)]
    training = TrainingConfig(trials=1, max_epochs=4, grace_period=4, seed=5)
    winners = {}
    with ray_session(RaySettings(num_cpus=2)):
        for made_for in ("gbdt", "tabular_net", "linear"):
            spec, payload = _made_for(made_for)
            cat, num, y = payload["train"]
            # As the train flow does: the network's wide part starts from the linear fit.
            payload["wide_init"] = fit_weights("classification", cat, num, y, spec["cardinalities"])
            outcome = tune_model(training, spec, share(payload), plan(spaces, training.seed), str(tmp_path),
                                 f"made-for-{made_for}")
            standings = {f: t.best_epoch("val_loss")["val_loss"] for f, t in outcome.best_by_family().items()}
            assert set(standings) == {"linear", "gbdt", "tabular_net", PLUGIN}, standings
            winners[made_for] = (outcome.best.family, standings)
    assert {k: v[0] for k, v in winners.items()} == {k: k for k in winners}, winners


def test_a_near_tie_goes_to_the_family_listed_first_and_a_clear_lead_wins():
    from compute.train import TrialOutcome, select

    def trial(family: str, loss: float) -> TrialOutcome:
        return TrialOutcome(family, family, {}, [{"epoch": 0, "val_loss": loss, "checkpoint_path": "x"}], "x")

    order = ["linear", "gbdt", "tabular_net"]
    near = [trial("tabular_net", 0.3205), trial("linear", 0.3210), trial("gbdt", 0.40)]
    assert select(near, order, "val_loss", 0.002).family == "linear"  # 0.16% behind: a tie
    assert select(near, order, "val_loss", 0.0).family == "tabular_net"
    clear = [trial("tabular_net", 0.260), trial("linear", 0.284), trial("gbdt", 0.274)]
    assert select(clear, order, "val_loss", 0.002).family == "tabular_net"


def test_a_gbdt_fit_resumed_from_its_checkpoint_continues_where_it_stopped(tmp_path):
    """What a restarted trial or Ray Train worker does (``resume_from``): the booster of the last
    reported block is loaded and boosting goes on from its round, with no block repeated, to
    the same model as a run that was never interrupted."""
    family = resolve("gbdt")
    spec, payload = _made_for("gbdt", n=2000)
    data = FitData(spec, payload["train"], payload["validation"])
    hp = {"learning_rate": 0.1, "num_leaves": 15, "rounds_per_iteration": 10}
    whole = PlainSession(tmp_path / "whole", iterations=4)
    family.fit(data, hp, whole)
    first = PlainSession(tmp_path / "first", iterations=2)
    family.fit(data, hp, first)

    class Resumed(PlainSession):
        def resume_from(self):  # noqa: ANN201
            return first.reports[-1][1]

    rest = Resumed(tmp_path / "rest", iterations=4)
    family.fit(data, hp, rest)
    assert [m["epoch"] for m, _ in rest.reports] == [2, 3]
    assert [m["rounds"] for m, _ in first.reports + rest.reports] == [10, 20, 30, 40]
    resumed = family.from_checkpoint(spec, hp, rest.reports[-1][1])
    uninterrupted = family.from_checkpoint(spec, hp, whole.reports[-1][1])
    cat, num, _ = data.validation
    np.testing.assert_allclose(family.predict(resumed, cat, num), family.predict(uninterrupted, cat, num), rtol=1e-9)


# --------------------------------------------------------------------------- a new dataset, end to end

MPLS_CONTRACT = """\
    name: mplsstops
    description: Police stops in the shape of Minneapolis' 2017 open data (carData::MplsStops), synthetic.
    base_table: stops
    tables:
      stops:
        source: {kind: file, path: "${MPLS_CSV}"}
        primary_key: [id_num]
        columns:
          id_num: {type: int, min: 1}
          date: {type: datetime}
          problem: {type: str, allowed: [suspicious, traffic]}
          mdc: {type: str, allowed: [MDC, other]}
          race: {type: str}
          gender: {type: str, allowed: [Male, Female, Unknown]}
          lat: {type: float, min: 44.8, max: 45.1}
          long: {type: float, min: -93.4, max: -93.1}
          police_precinct: {type: int, min: 1, max: 5}
          neighborhood: {type: str}
          person_search: {type: int, allowed: [0, 1]}
    derived:
      - {name: hour, op: hour, column: date, timezone: America/Chicago}
    target: {column: person_search, kind: binary, threshold: 0.5, name: searched}
    features:
      categorical: [problem, mdc, race, gender, neighborhood, hour]
      numeric: [lat, long]
    time_column: date
    split: {train_fraction: 0.6, validation_fraction: 0.2}
    """


@pytest.fixture
def mplsstops(tmp_path, monkeypatch):
    """A stops table shaped like MplsStops: searches follow the kind of stop, the hour and a
    few city blocks (a box of latitude and longitude: trees find it, a linear model cannot)."""
    import pandas as pd

    from tests.conftest import write_contract

    rng = np.random.default_rng(7)
    n = 6000
    lat = rng.uniform(44.89, 45.05, n)
    long = rng.uniform(-93.33, -93.19, n)
    problem = rng.choice(["suspicious", "traffic"], n, p=[0.45, 0.55])
    dates = pd.date_range("2017-01-01", periods=n, freq="83min", tz="America/Chicago")
    hour = dates.hour.to_numpy()
    block = (np.abs(lat - 44.98) < 0.03) & (np.abs(long + 93.26) < 0.03)
    logit = -2.8 + 1.3 * (problem == "suspicious") + 3.0 * block + 0.6 * ((hour < 5) | (hour > 21))
    frame = pd.DataFrame({
        "id_num": np.arange(1, n + 1),
        "date": dates.tz_convert("UTC"),
        "problem": problem, "mdc": rng.choice(["MDC", "other"], n, p=[0.8, 0.2]),
        "race": rng.choice(["White", "Black", "East African", "Latino", "Native American", "Asian", "Unknown"], n),
        "gender": rng.choice(["Male", "Female", "Unknown"], n, p=[0.6, 0.3, 0.1]),
        "lat": lat.round(5), "long": long.round(5), "police_precinct": rng.integers(1, 6, n),
        "neighborhood": rng.choice([f"nb{i:02d}" for i in range(40)], n),
        "person_search": (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)})
    frame.to_csv(tmp_path / "mplsstops.csv", index=False)
    monkeypatch.setenv("MPLS_CSV", str(tmp_path / "mplsstops.csv"))
    write_contract(tmp_path / "datasets", "mplsstops", MPLS_CONTRACT)
    return tmp_path / "datasets"


@pytest.mark.slow
def test_a_new_dataset_trains_every_family_registers_the_winner_and_reproduces_it(home, prefect_harness, mplsstops):
    """A contract file alone: ingest, ETL, all three families, the winner (trees: the searches
    sit in a box of latitude and longitude) registered because it beats the prior, loaded as
    serving loads it, and rebuilt exactly by --reproduce."""
    from core.registry import Registry, load_version
    from core.settings import configure
    from flows.train import TrainParams, train

    settings = configure(home=str(home.home), datasets_dir=str(mplsstops), train={
        "trials": 1, "max_epochs": 3, "grace_period": 1, "num_workers": 1,
        "search_space": {"lr": [0.01, 0.02], "width": [32], "depth": [1], "dropout": [0.0], "embedding_dim": [4],
                         "batch_size": [128], "weight_decay": [1e-6, 1e-5]}})
    result = train(TrainParams(dataset="mplsstops"))
    assert set(result.families) == {"linear", "gbdt", "tabular_net"}, result.families
    assert result.family == "gbdt", result.families
    assert all(v["roc_auc"] > result.baselines["prior"]["roc_auc"] for v in result.families.values())
    assert result.registered_version == "1", result.decision
    assert result.decision[0].startswith("winner gbdt (validation loss ")
    assert "beats it by the margin" in result.decision[1]

    registry = Registry.for_uri(settings.tracking_uri)
    version = registry.client.get_model_version(result.model_name, "1")
    assert version.tags["flywheel.family"] == "gbdt"
    loaded = load_version(registry, result.model_name, version)  # as serving loads it: sha256 checked
    assert loaded.model.family_name == "gbdt"

    repro = train(TrainParams(dataset="mplsstops", reproduce="1"))
    assert repro.family == "gbdt"
    assert repro.reproduced["max_abs_diff"] == 0.0, repro.reproduced  # deterministic trees: the same model
