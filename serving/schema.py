"""Request and response models, generated from a dataset contract.

A record is a row of the base table as its source has it: it may carry any column the contract
declares for that table, typed and checked as the contract says, never the target (ground
truth goes to ``/feedback``). The columns the features, joins and derivations read keep their
required-ness; every other declared column is optional, accepted and not scored, and each
prediction lists those a record carried in ``ignored_fields`` (they are logged with it). Any
column a join would add may be sent too, and then wins over the lookup. A name the contract
does not know, wrong types, NaN and infinity are refused with a message naming the field (an
unknown name with the closest known one: "did you mean 'dep_delay'?"), before a record can
reach a batch. The record's JSON schema says the same: the optional columns, and no other
properties.
"""

from __future__ import annotations

import difflib
import re
import time
from datetime import datetime
from typing import Annotated, Any, Literal, Optional
from zoneinfo import ZoneInfo

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    create_model,
)
from pydantic_core import PydanticCustomError

from core.contract import CONTROL_CHARACTERS, ColumnSpec, DatasetContract

PYTHON_TYPES: dict[str, Any] = {"int": int, "float": float, "str": str, "bool": bool, "datetime": datetime}


# What pandas can hold (1677-09-21 to 2262-04-11), whatever the offset: a time outside these
# years is refused, not a server error. The OpenAPI document says so with a pattern, and that
# text is refused too, so the document and the service agree on every input.
YEARS = (1678, 2261)
YEAR_PATTERN = r"^(167[89]|16[89][0-9]|1[7-9][0-9]{2}|2[01][0-9]{2}|22[0-5][0-9]|226[01])-"
# After the year: a real calendar day (29 February left out), a time, and an optional zone. What
# the document allows, validation accepts (stricter is allowed: a client reading it is never refused).
LOCAL_TIME_PATTERN = (r"((0[13578]|1[02])-(0[1-9]|[12][0-9]|3[01])|(0[469]|11)-(0[1-9]|[12][0-9]|30)"
                      r"|02-(0[1-9]|1[0-9]|2[0-8]))[Tt ]([01][0-9]|2[0-3]):[0-5][0-9](:[0-5][0-9](\.[0-9]{1,6})?)?"
                      r"([Zz]|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?$")
TEXT_PATTERN = r"^[^\x00-\x08\x0b\x0c\x0e-\x1f\x7f]*$"  # CONTROL_CHARACTERS, for the document
MAX_TEXT = 256
INT64 = (-(2**63), 2**63 - 1)


def _in_pandas_range(value: datetime) -> datetime:
    if not YEARS[0] <= value.year <= YEARS[1]:
        raise ValueError(f"the year must be between {YEARS[0]} and {YEARS[1]}")
    return value


def _a_time(value: Any) -> Any:
    """A datetime is sent as ISO 8601 text: a number (epoch seconds?) is not guessed at."""
    if not isinstance(value, str | datetime):
        raise ValueError("must be an ISO 8601 date and time text, e.g. 2013-06-01T14:00:00Z")
    if isinstance(value, str) and not re.match(YEAR_PATTERN, value):
        raise ValueError(f"must be an ISO 8601 date and time text with a year between {YEARS[0]} and {YEARS[1]}, "
                         "e.g. 2013-06-01T14:00:00Z")
    return value


def _zoned(zone: str | None) -> Any:
    def check(value: datetime) -> datetime:
        if value.tzinfo is not None:
            return value
        if zone is None:  # the join and the hour features would silently read it as another time
            raise ValueError("needs a time zone (e.g. 2013-06-01T14:00:00Z or +02:00): the contract declares "
                             "none to assume for this field")
        return value.replace(tzinfo=ZoneInfo(zone))
    return check


def _no_control_characters(value: str) -> str:
    found = re.search(CONTROL_CHARACTERS, value)
    if found:
        raise ValueError(f"holds a control character ({found.group()!r} at {found.start()})")
    return value


def field_type(spec: ColumnSpec) -> Any:
    """The python type of a contract column, with the contract's own row checks (range,
    allowed values): a value the ingest gate would quarantine is refused here too. Strict: no
    text or boolean is turned into a number, no number into a boolean or a time."""
    if spec.allowed is not None:
        return Literal[tuple(spec.allowed)]  # type: ignore[valid-type]
    if spec.type == "int":
        low = max(INT64[0], int(spec.min)) if isinstance(spec.min, int | float) else INT64[0]
        high = min(INT64[1], int(spec.max)) if isinstance(spec.max, int | float) else INT64[1]
        return Annotated[int, Field(strict=True, ge=low, le=high)]
    if spec.type == "float":
        floor = float(spec.min) if isinstance(spec.min, int | float) else None
        ceiling = float(spec.max) if isinstance(spec.max, int | float) else None
        return Annotated[float, Field(strict=True, ge=floor, le=ceiling)]
    if spec.type == "datetime":
        # RFC 3339's date-time has an offset; a column whose contract declares a zone takes one without.
        document = ({"type": "string", "format": "date-time", "pattern": YEAR_PATTERN} if spec.timezone is None
                    else {"type": "string", "pattern": YEAR_PATTERN + LOCAL_TIME_PATTERN})
        return Annotated[datetime, BeforeValidator(_a_time), AfterValidator(_zoned(spec.timezone)),
                         AfterValidator(_in_pandas_range), WithJsonSchema(document)]
    if spec.type == "bool":
        return Annotated[bool, Field(strict=True)]
    return Annotated[str, Field(strict=True, max_length=MAX_TEXT, json_schema_extra={"pattern": TEXT_PATTERN}),
                     AfterValidator(_no_control_characters)]


def request_fields(contract: DatasetContract) -> dict[str, tuple[Any, bool]]:
    """Field name -> (type, required) for one record of ``contract``: every column of the base
    table but the target (those the model reads are required unless nullable, the others
    optional), then the joined columns (optional)."""
    base = contract.tables[contract.base_table]
    needed = set(contract.base_columns_needed())
    fields: dict[str, tuple[Any, bool]] = {}
    for name, spec in base.columns.items():
        if name != contract.target.column:
            fields[name] = (field_type(spec), name in needed and not spec.nullable)
    for join in contract.joins:
        table = contract.tables[join.table]
        for column in contract.join_columns(join):
            fields.setdefault(f"{column}{join.suffix}", (field_type(table.columns[column]), False))
    return fields


def scored_fields(contract: DatasetContract) -> frozenset[str]:
    """The fields of a record the model reads (what ``core.transform.record_columns`` takes):
    the base columns the features, joins and derivations need, and the joined columns. A
    record's other fields are its ``ignored_fields``."""
    joined = {f"{column}{join.suffix}" for join in contract.joins for column in contract.join_columns(join)}
    return frozenset(set(contract.base_columns_needed()) - {contract.target.column} | joined)


# difflib costs about 60 us a name: a body of made-up names must not buy minutes of CPU, so a
# worker looks up at most this many a second (beyond, the message names no closest field).
SUGGESTIONS_PER_S = 1000
_suggested = [0, 0]  # the current second (monotonic), names looked up in it


def _closest(name: str, known: list[str]) -> str | None:
    """The known name closest to ``name`` (difflib, case ignored), or None."""
    # A ratio of 0.6 needs the longer name at most 7/3 the length of the shorter one.
    if not known or len(name) > 7 * max(map(len, known)) // 3 + 1:
        return None
    second = int(time.monotonic())
    if _suggested[0] != second:
        _suggested[:] = [second, 0]
    if _suggested[1] >= SUGGESTIONS_PER_S:
        return None
    _suggested[1] += 1
    lowered = {k.lower(): k for k in known}
    match = difflib.get_close_matches(name.lower(), list(lowered), n=1)
    return lowered[match[0]] if match else None


def _refusal(contract: DatasetContract, known: list[str]) -> Any:
    """The validator of a record's names that are not fields: each is refused, the target as
    ground truth and any other name with the closest known one."""
    target = contract.target.column

    def refuse(name: str) -> str:
        shown = repr(name if len(name) <= 80 else name[:80] + "...")
        if name == target:
            raise PydanticCustomError(
                "target_forbidden", f"{name!r} is the target, the ground truth the model predicts: not an input "
                "(send it to /feedback with the prediction's request_id)")
        closest = _closest(name, [*known, target])
        if closest == target:
            hint = f"the target {target!r} is not an input either (ground truth goes to /feedback)"
        elif closest is not None:
            hint = f"did you mean {closest!r}?"
        else:
            hint = f"not a column of the {contract.base_table!r} table nor a joined one"
        raise PydanticCustomError("extra_forbidden", f"unknown field {shown}: {hint}")
    return refuse


def record_model(contract: DatasetContract) -> type[BaseModel]:
    """The pydantic model of one record (strict about unknown fields, NaN and infinity).

    Unknown names go to ``__pydantic_extra__``, whose key validator refuses each with its own
    message (pydantic's ``extra="forbid"`` cannot say "did you mean"); a record with none costs
    nothing more. The JSON schema keeps ``additionalProperties: false``: nothing else is taken."""
    scored = scored_fields(contract)
    fields = request_fields(contract)
    definitions: dict[str, Any] = {}
    for name, (kind, required) in fields.items():
        if required:
            definitions[name] = (kind, ...)
        elif name in scored:
            definitions[name] = (Optional[kind], None)  # noqa: UP045
        else:
            definitions[name] = (Optional[kind], Field(None, description=(  # noqa: UP045
                "Not read by the model: accepted, logged with the prediction and listed in its ignored_fields.")))
    described = (f"A row of the {contract.base_table!r} table as its source has it: any column the contract "
                 f"declares but the target {contract.target.column!r} (ground truth goes to /feedback), and any "
                 "joined column (a value sent wins over the lookup's). No other field is accepted.")
    config = ConfigDict(extra="allow", allow_inf_nan=False, str_max_length=MAX_TEXT,
                        json_schema_extra={"additionalProperties": False, "description": described})
    refuse = AfterValidator(_refusal(contract, list(fields)))
    base = type("SourceRecord", (BaseModel,), {
        "__annotations__": {"__pydantic_extra__": dict[Annotated[str, refuse], Any]}, "model_config": config})
    model: type[BaseModel] = create_model(f"{contract.name.title()}Record", __base__=base, **definitions)
    return model


class Prediction(BaseModel):
    request_id: str = Field(description="Quote it in /feedback to report the ground truth.")
    score: float = Field(description="Probability of the positive class, or the predicted value.")
    decision: bool | None = Field(description="Classification: score >= the model's threshold.")
    variant: Literal["champion", "challenger"]
    model_name: str
    model_version: str
    missing_lookups: list[str] = Field(description="Joined tables with no row for this record's keys "
                                       "(their features take the 'unknown' encoding, as in training).")
    ignored_fields: list[str] = Field(description=(
        "Fields this record carried that the model does not read (declared columns of the base table "
        "no feature uses, such as its keys), in name order: accepted and logged with the prediction, "
        "never scored. Empty when the model reads every field sent."))


class PredictResponse(BaseModel):
    predictions: list[Prediction]


class FeedbackItem(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    request_id: str = Field(min_length=1, max_length=64, strict=True)
    actual: float = Field(strict=True, description="The ground truth in the target column's units (e.g. arr_delay).")


class FeedbackResponse(BaseModel):
    accepted: int
    unknown_request_ids: list[str] = Field(description="Ids no prediction was logged for: not recorded.")
