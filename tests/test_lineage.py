"""A version's lineage is written and read through one model (``core.lineage.Lineage``)."""

from __future__ import annotations

import pytest

from core.lineage import Lineage


def test_lineage_round_trips_through_tags_and_reads_what_older_versions_wrote():
    lineage = Lineage(dataset="flights", feature_version=7, hyperparameters={"lr": 0.01, "width": 64},
                      metrics={"roc_auc": 0.7, "threshold": 0.21}, epochs_trained=4, seed=13, num_workers=2,
                      training={"trials": 2}, decision=["beats the prior", "not worse"], weights_sha256="ab" * 32)
    tags = lineage.to_tags()
    assert tags["flywheel.feature_version"] == "7" and tags["flywheel.metrics"] == '{"roc_auc": 0.7, "threshold": 0.21}'
    assert Lineage.from_tags({**tags, "mlflow.user": "x", "flywheel.ab_decision": "{}"}) == lineage
    # A version registered before the model (every value a string or JSON text) reads the same.
    old = {"flywheel.feature_version": "3", "flywheel.epochs_trained": "5", "flywheel.seed": "13",
           "flywheel.hyperparameters": '{"lr": 0.02}', "flywheel.metrics": '{"roc_auc": 0.69}'}
    read = Lineage.from_tags(old)
    assert (read.feature_version, read.epochs_trained, read.hyperparameters, read.metrics["roc_auc"]) == (
        3, 5, {"lr": 0.02}, 0.69)
    assert read.missing("feature_version", "num_workers", "weights_sha256") == [
        "flywheel.num_workers", "flywheel.weights_sha256"]


def test_a_field_that_is_not_lineage_is_refused():
    with pytest.raises(KeyError):
        Lineage.tag("feature_versoin")
