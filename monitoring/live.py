"""Monitoring's library: the champion's reference inputs, the live window, drift, live
performance, reports and gauges (``tasks.monitor`` wraps these as Prefect tasks).

Both sides are compared in the model's own input space, decoded to readable values: each
categorical as its category (``<unknown>`` for a value the model had not seen), each numeric in
its original units. The reference is the training split of the feature table version the
champion was trained on (its lineage); the live window is the latest served predictions in the
prediction log, put through the same lookups and transform the service applied.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from core.contract import DatasetContract
from core.features import SPLIT_COLUMN, FeatureStats
from core.lake import Lake, LakeError, read_arrow
from core.prediction_log import labelled_predictions
from monitoring.drift import DriftResult, DriftThresholds, detect_drift

log = logging.getLogger(__name__)
UNKNOWN = "<unknown>"


@dataclass
class Window:
    """Model inputs (decoded) with the scores, variants and versions that went with them."""

    inputs: pd.DataFrame
    rows_logged: int
    first_ts: Any
    last_ts: Any


def decode(encoded: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> pd.DataFrame:
    """Encoded model inputs back to readable values (categories; numerics in their units)."""
    out = {}
    for name in contract.features.categorical:
        vocab = np.array([UNKNOWN, *stats.vocabularies[name]], dtype=object)
        out[name] = vocab[encoded[name].to_numpy(np.int64)]
    for name in contract.features.numeric:
        out[name] = encoded[name].to_numpy(np.float64) * stats.stds[name] + stats.means[name]
    return pd.DataFrame(out, index=encoded.index)


def reference_inputs(lake: Lake, contract: DatasetContract, feature_version: int, stats: FeatureStats,
                     max_rows: int, seed: int = 0) -> pd.DataFrame:
    """The training split of the feature table version the champion learnt from (a sample)."""
    uri = lake.uri("features", contract.name)
    if not lake.exists(uri):
        raise LakeError(f"no feature table at {uri}")
    columns = [SPLIT_COLUMN, *contract.features.categorical, *contract.features.numeric]
    frame = read_arrow(lake.table(uri, feature_version), columns).to_pandas()
    train = frame[frame[SPLIT_COLUMN] == "train"]
    if len(train) > max_rows:
        train = train.sample(max_rows, random_state=seed)
    return decode(train, contract, stats).reset_index(drop=True)


def live_inputs(lake: Lake, contract: DatasetContract, stats: FeatureStats, max_rows: int) -> Window:
    """The latest ``max_rows`` served predictions, as the model saw them (decoded), with their
    score, variant and model version."""
    from core.features import index_lookups, prepare_lookups
    from core.transform import encode_records

    uri = lake.uri("serving", contract.name, "predictions")
    columns = ["request_id", "ts", "variant", "model_version", "inputs", "score", "served"]
    if not lake.exists(uri):
        return Window(pd.DataFrame(columns=[*contract.features.categorical, *contract.features.numeric]), 0,
                      None, None)
    logged = read_arrow(lake.table(uri), columns).to_pandas()
    logged = logged[logged["served"]].sort_values("ts").tail(max_rows).reset_index(drop=True)
    if logged.empty:
        return Window(pd.DataFrame(columns=[*contract.features.categorical, *contract.features.numeric]), 0,
                      None, None)
    records = [json.loads(text) for text in logged["inputs"]]
    raw = {join.table: lake.read_pandas(lake.uri("raw", contract.name, join.table)) for join in contract.joins}
    lookups = index_lookups(prepare_lookups(raw, contract), contract)
    categorical, numeric, _ = encode_records(records, lookups, contract, stats)  # as the service did
    encoded = pd.DataFrame({**dict(zip(contract.features.categorical, categorical.T, strict=True)),
                            **dict(zip(contract.features.numeric, numeric.T, strict=True))})
    inputs = decode(encoded, contract, stats)
    inputs["score"] = logged["score"].to_numpy()
    inputs["variant"] = logged["variant"].to_numpy()
    inputs["model_version"] = logged["model_version"].to_numpy()
    inputs["request_id"] = logged["request_id"].to_numpy()
    return Window(inputs, len(logged), logged["ts"].iloc[0], logged["ts"].iloc[-1])



def scored_reference(lake: Lake, contract: DatasetContract, champion: Any, max_rows: int) -> pd.DataFrame:
    """The champion's reference inputs (``reference_inputs``, from the feature table version in
    its lineage) with its own scores on them (``score``, for prediction drift)."""
    reference = reference_inputs(lake, contract, champion.feature_version, champion.stats, max_rows)
    reference["score"] = reference_scores(champion.model, reference, contract, champion.stats)
    return reference


def reference_scores(model: Any, reference: pd.DataFrame, contract: DatasetContract,
                     stats: FeatureStats) -> np.ndarray:
    """The model's scores (any family's ``Fitted``) on the reference rows (for prediction drift)."""
    encoded = encode_decoded(reference, contract, stats)
    return model.predict(encoded[0], encoded[1])


def encode_decoded(decoded: pd.DataFrame, contract: DatasetContract, stats: FeatureStats) -> tuple[np.ndarray, np.ndarray]:
    """``decode``'s inverse, to arrays the model takes."""
    codes = []
    for name in contract.features.categorical:
        index = {value: i + 1 for i, value in enumerate(stats.vocabularies[name])}
        codes.append(np.fromiter((index.get(v, 0) for v in decoded[name]), dtype=np.int64, count=len(decoded)))
    numerics = [((decoded[name].to_numpy(np.float64) - stats.means[name]) / stats.stds[name]).astype(np.float32)
                for name in contract.features.numeric]
    return (np.stack(codes, axis=1) if codes else np.empty((len(decoded), 0), np.int64),
            np.stack(numerics, axis=1) if numerics else np.empty((len(decoded), 0), np.float32))


@dataclass
class Performance:
    variant: str
    model_version: str
    rows: int
    metric: str
    live: float | None
    registered: float | None
    degraded: bool | None
    reason: str


def evidently_metric(part: pd.DataFrame, classification: bool) -> tuple[float, Any]:
    """The variant's metric from Evidently's report on its labelled predictions: ROC AUC from
    the classification preset, RMSE from the regression preset. Returns (value, snapshot)."""
    from evidently import BinaryClassification, DataDefinition, Dataset, Regression, Report
    from evidently.presets import ClassificationPreset, RegressionPreset

    frame = part[["label", "score"]].copy()
    if classification:
        frame["label"] = frame["label"].astype(int)
        definition = DataDefinition(classification=[BinaryClassification(
            target="label", prediction_probas="score", pos_label=1)])
        preset, wanted = ClassificationPreset(), "RocAuc("
    else:
        definition = DataDefinition(regression=[Regression(target="label", prediction="score")])
        preset, wanted = RegressionPreset(), "RMSE("
    snapshot = Report([preset]).run(current_data=Dataset.from_pandas(frame, data_definition=definition))
    for metric in snapshot.dict()["metrics"]:
        name = str(metric.get("metric_name") or metric.get("metric_id") or "")
        if name.startswith(wanted):
            value = metric["value"]
            return float(value["mean"] if isinstance(value, dict) else value), snapshot
    raise RuntimeError(f"Evidently's report has no {wanted.rstrip('(')} metric")


def live_performance(lake: Lake, contract: DatasetContract, registered: dict[str, dict[str, float]],
                     tolerance: float, min_rows: int) -> tuple[list[Performance], dict[str, Any]]:
    """Per variant and model version: the model's metric on predictions that have feedback
    (from Evidently's classification or regression report), against the metric recorded at
    registration. ``registered``: version -> its metrics. Returns the judgements and, for each
    variant judged, its Evidently snapshot ("champion v3" -> snapshot)."""
    joined = labelled_predictions(lake, contract)
    classification = contract.task == "classification"
    metric = "roc_auc" if classification else "rmse"
    out, snapshots = [], {}
    for (variant, version), part in joined.groupby(["variant", "model_version"]):
        labels = part["label"]
        reference = registered.get(str(version), {}).get(metric)
        if len(part) < min_rows or (classification and labels.nunique() < 2):
            out.append(Performance(str(variant), str(version), len(part), metric, None, reference, None,
                                   f"{len(part)} predictions with feedback: at least {min_rows} (of both "
                                   "classes) are needed to judge"))
            continue
        live, snapshots[f"{variant} v{version}"] = evidently_metric(part, classification)
        if reference is None:
            degraded, reason = None, f"live {metric} {live:.4f}; no {metric} recorded at registration"
        elif classification:
            degraded = live < reference - tolerance
            reason = f"live {metric} {live:.4f} vs {reference:.4f} at registration (tolerance {tolerance})"
        else:
            degraded = live > reference * (1 + tolerance)
            reason = f"live {metric} {live:.4f} vs {reference:.4f} at registration (tolerance {tolerance:.0%})"
        out.append(Performance(str(variant), str(version), len(part), metric, live, reference, degraded, reason))
    return out, snapshots


def write_report(snapshot: Any, uri: str) -> str:
    """Evidently's HTML report at ``uri`` (a path, or an object-store URL under the shared root)."""
    from core.storage import Staging

    staged = Staging(uri)
    snapshot.save_html(str(staged.path))
    return staged.keep()


def add_to_workspace(workspace: str, project_name: str, snapshot: Any) -> str:
    """Add the run to an Evidently workspace: a local folder (``evidently ui --workspace ...``
    shows it) or an Evidently UI service's URL (``http://host:8000``)."""
    from evidently.ui.workspace import RemoteWorkspace, Workspace

    ws: Any = RemoteWorkspace(workspace) if workspace.startswith(("http://", "https://")) else Workspace.create(workspace)
    found = [p for p in ws.list_projects() if p.name == project_name]
    project = found[0] if found else ws.create_project(project_name)
    ws.add_run(project.id, snapshot, include_data=False)
    return str(project.id)


def push_gauges(gateway: str, job: str, values: dict[str, float], labels: dict[str, str]) -> None:
    """Push gauges to a Prometheus Pushgateway, grouped by ``job`` and ``labels`` (a push
    replaces that group's earlier values only)."""
    from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

    registry = CollectorRegistry()
    for name, value in values.items():
        gauge = Gauge(name, name.replace("_", " "), registry=registry)
        gauge.set(value)
    push_to_gateway(gateway, job=job, registry=registry, grouping_key=labels, timeout=5)


def drift(reference: pd.DataFrame, live: pd.DataFrame, contract: DatasetContract, thresholds: DriftThresholds,
          method: str) -> DriftResult:
    """The drift decision on the model inputs and its predictions (``score``)."""
    return detect_drift(reference, live, list(contract.features.categorical), list(contract.features.numeric),
                        thresholds, method="evidently" if method == "evidently" else "psi", prediction_column="score")


def drift_report(reference: pd.DataFrame, live: pd.DataFrame, contract: DatasetContract, result: DriftResult,
                 thresholds: DriftThresholds) -> Any:
    """Evidently's snapshot for the HTML report, whatever scored the decision (on a sample)."""
    return result.details.get("snapshot") or detect_drift(
        reference, live, list(contract.features.categorical), list(contract.features.numeric), thresholds,
        method="evidently").details["snapshot"]
