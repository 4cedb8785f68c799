"""Request and response models, generated from a dataset contract.

A record carries the base table's columns that the features, joins and derivations read (the
target never), typed as the contract says; any column a join would add may be sent too, and
then wins over the lookup. The base table's primary-key columns may be sent to identify a
record in the prediction log. Unknown fields, wrong types, NaN and infinity are refused with a
message naming the field, before a record can reach a batch.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from core.contract import DatasetContract

PYTHON_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "datetime": datetime}


def request_fields(contract: DatasetContract) -> dict[str, tuple[Any, bool]]:
    """Field name -> (python type, required) for one record of ``contract``."""
    base = contract.tables[contract.base_table]
    needed = [c for c in contract.base_columns_needed() if c != contract.target.column]
    fields: dict[str, tuple[Any, bool]] = {}
    for name in needed:
        spec = base.columns[name]
        fields[name] = (PYTHON_TYPES[spec.type], not spec.nullable)
    for name in base.primary_key or []:
        if name not in fields and name != contract.target.column:
            fields[name] = (PYTHON_TYPES[base.columns[name].type], False)
    for join in contract.joins:
        table = contract.tables[join.table]
        for column in contract.join_columns(join):
            fields.setdefault(f"{column}{join.suffix}", (PYTHON_TYPES[table.columns[column].type], False))
    return fields


def record_model(contract: DatasetContract) -> type[BaseModel]:
    """The pydantic model of one record (strict about unknown fields, NaN and infinity)."""
    definitions: dict[str, Any] = {}
    for name, (kind, required) in request_fields(contract).items():
        definitions[name] = (kind, ...) if required else (kind | None, None)
    config = ConfigDict(extra="forbid", allow_inf_nan=False, str_max_length=256)
    model: type[BaseModel] = create_model(f"{contract.name.title()}Record", __config__=config,
                                          **definitions)
    return model


class Prediction(BaseModel):
    request_id: str = Field(description="Quote it in /feedback to report the ground truth.")
    score: float = Field(description="Probability of the positive class, or the predicted value.")
    decision: bool | None = Field(description="Classification: score >= threshold.")
    variant: Literal["champion", "challenger"]
    model_name: str
    model_version: str
    missing_lookups: list[str] = Field(description="Joined tables with no row for this record's keys "
                                       "(their features take the 'unknown' encoding, as in training).")


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(min_length=1, max_length=64)
    actual: float = Field(description="The ground truth in the target column's units (e.g. arr_delay).")


class FeedbackResponse(BaseModel):
    accepted: int
    unknown_request_ids: list[str] = Field(description="Ids no prediction was logged for: not recorded.")
