"""The service's prediction log (``serving/<dataset>/predictions``) and its ground truth
(``.../feedback``) in the lake, read back for the A/B decision and live monitoring."""

from __future__ import annotations

import pandas as pd

from core.contract import DatasetContract
from core.lake import Lake, read_arrow


def labelled_predictions(lake: Lake, contract: DatasetContract, with_inputs: bool = False) -> pd.DataFrame:
    """Served predictions that received ground truth (the latest feedback per request), with
    ``ts`` (when it was served) and ``label``: the contract's target rule applied to the
    actual value; ``decision`` (what the service answered: score >= the model's threshold, or
null for regression); ``inputs`` (each record as sent, JSON) too when asked. Empty when either log
    is missing."""
    columns = ["request_id", "ts", "variant", "model_version", "score", "decision", "actual", "label",
               *(["inputs"] if with_inputs else [])]
    predictions_uri = lake.uri("serving", contract.name, "predictions")
    feedback_uri = lake.uri("serving", contract.name, "feedback")
    if not (lake.exists(predictions_uri) and lake.exists(feedback_uri)):
        return pd.DataFrame(columns=columns)
    served = read_arrow(lake.table(predictions_uri), ["request_id", "ts", "variant", "model_version", "score",
                                                      "decision", "served",
                                                      *(["inputs"] if with_inputs else [])]).to_pandas()
    feedback = read_arrow(lake.table(feedback_uri), ["request_id", "ts", "actual"]).to_pandas()
    feedback = feedback.sort_values("ts").drop_duplicates("request_id", keep="last").drop(columns=["ts"])
    joined = served[served["served"]].merge(feedback, on="request_id")
    actual = joined["actual"].astype(float)
    joined["label"] = (actual > float(contract.target.threshold or 0)).astype(float) \
        if contract.task == "classification" else actual
    return joined[columns]
