"""Dataset contracts: what a dataset's tables are, how to read, check, join and featurize them.

A new tabular dataset is onboarded by writing ``config/datasets/<name>.yaml``; the flows read
everything they need from the contract and nothing dataset-specific lives in code.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.errors import FlywheelError
from core.secrets import mask_text

ColumnType = Literal["int", "float", "str", "bool", "datetime"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Control characters a value may not hold (tab, line feed and carriage return are text): the
# ingest gate quarantines a row with one, the service refuses a record with one.
CONTROL_CHARACTERS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"


class ColumnSpec(_Strict):
    """One column of a source table and the checks the gate applies to it."""

    type: ColumnType
    nullable: bool = Field(False, description="Whether nulls are allowed at all.")
    max_null_fraction: float = Field(
        0.0, ge=0, le=1, description="Table-level: the share of nulls above which a batch is rejected."
    )
    min: float | str | None = Field(None, description="Row-level: smallest allowed value.")
    max: float | str | None = Field(None, description="Row-level: largest allowed value.")
    allowed: list[Any] | None = Field(None, description="Row-level: the allowed values.")
    allow_non_finite: bool = Field(
        False, description="float columns: accept inf and -inf. By default rows holding them are "
        "quarantined (NaN is a null: nullable and max_null_fraction govern it)."
    )
    timezone: str | None = Field(
        None, description="datetime columns: the zone of a value given without one (e.g. UTC or "
        "America/New_York). Unset: the service refuses such a value with a 400 naming the field, and "
        "ingest quarantines a row whose text holds one (a typed timestamp without a zone, from "
        "Parquet or SQL, is read as UTC)."
    )

    @model_validator(mode="after")
    def _nulls(self) -> ColumnSpec:
        if self.max_null_fraction > 0 and not self.nullable:
            raise ValueError("max_null_fraction > 0 needs nullable: true")
        if self.allow_non_finite and self.type != "float":
            raise ValueError(f"allow_non_finite applies to float columns only, not {self.type} "
                             "(an int column cannot hold inf)")
        if self.timezone is not None:
            if self.type != "datetime":
                raise ValueError(f"timezone applies to datetime columns only, not {self.type}")
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(self.timezone)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"timezone {self.timezone!r} is not a known time zone") from exc
        return self


class FileSource(_Strict):
    kind: Literal["file"]
    path: str = Field(
        description="Local path, fsspec URL (s3://, https://, memory://) or "
        "package://<python package>/<file inside it>. ${VARS} are expanded. A glob "
        "(landing/*.csv) reads every matching file, in name order, as one batch."
    )
    format: Literal["csv", "parquet", "auto"] = "auto"
    read_options: dict[str, Any] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (key, secret, endpoint_url, ...); "
        "${VARS} in string values, at any depth, are expanded."
    )


class SqlSource(_Strict):
    kind: Literal["sql"]
    url: str = Field(description="SQLAlchemy URL; ${VARS} are expanded so secrets stay in the env.")
    query: str
    chunk_rows: int = Field(100_000, ge=1)


class HttpSource(_Strict):
    kind: Literal["http"]
    url: str = Field(description="First page's URL; ${VARS} are expanded (e.g. ?api_key=${API_KEY}).")
    records_path: str = Field("data", description="Key of the list of records in each page.")
    next_path: str | None = Field(
        "next", description="Key holding the next page's URL (null when done)."
    )
    page_param: str | None = Field(
        None, description="Alternative paging: a page-number query parameter, until an empty page."
    )
    params: dict[str, Any] = Field(
        default_factory=dict, description="Query parameters of the first page; ${VARS} in values are expanded."
    )
    headers: dict[str, str] = Field(
        default_factory=dict, description='Request headers; ${VARS} in values are expanded '
        '(Authorization: "Bearer ${API_TOKEN}").'
    )
    headers_from_env: dict[str, str] = Field(
        default_factory=dict, description="Header name -> environment variable holding its value."
    )
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_pages: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _one_value_per_header(self) -> HttpSource:
        both = {h.lower() for h in self.headers} & {h.lower() for h in self.headers_from_env}
        if both:
            raise ValueError(f"headers {sorted(both)} are set in both headers and headers_from_env")
        return self


class StreamSource(_Strict):
    """A live log the table is fed from (``python -m flows.stream``), not a batch to ingest.
    Each message carries one row: the table's raw fields as the message's field-value pairs."""

    kind: Literal["stream"]
    url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL; ${VARS} are expanded "
                     "(redis://:${REDIS_PASSWORD}@host:6379/0).")
    stream: str = Field(min_length=1, description="The stream's key.")
    group: str = Field("flywheel", min_length=1, description="Consumer group (created at the stream's start).")
    batch_rows: int = Field(5000, ge=1, description="Most messages in one micro-batch (one Delta commit).")
    max_wait_ms: int = Field(1000, ge=1, description="Longest a message waits for its micro-batch to fill.")
    max_deliveries: int = Field(5, ge=1, description="A message delivered this often without being committed "
                                "(it crashes the consumer) is quarantined as poison.")


Source = Annotated[FileSource | SqlSource | HttpSource | StreamSource, Field(discriminator="kind")]


class CustomExpectation(_Strict):
    """Any Great Expectations expectation by its snake_case name, e.g.
    ``expect_column_pair_values_a_to_be_greater_than_b`` with its keyword arguments."""

    type: str = Field(pattern=r"^expect_[a-z0-9_]+$")
    kwargs: dict[str, Any] = Field(default_factory=dict)
    level: Literal["row", "table"] = Field(
        "row", description="row: failing rows are quarantined; table: a failure rejects the batch."
    )


class TableSpec(_Strict):
    source: Source
    primary_key: list[str] = Field(default_factory=list)
    columns: dict[str, ColumnSpec]
    max_bad_row_fraction: float = Field(
        0.01, ge=0, le=1, description="A batch with a larger share of quarantined rows is rejected."
    )
    extra_columns: Literal["drop", "reject"] = Field(
        "drop", description="Columns not in the contract: dropped with a warning, or reject."
    )
    custom_expectations: list[CustomExpectation] = Field(default_factory=list)
    on_key_conflict: Literal["update", "quarantine"] = Field(
        "update", description="Tables with a primary_key are written by key: a row whose key is "
        "already in the table with other values is updated, or quarantined as a conflict.")

    @model_validator(mode="after")
    def _keys_are_columns(self) -> TableSpec:
        missing = [k for k in self.primary_key if k not in self.columns]
        if missing:
            raise ValueError(f"primary_key names columns not declared: {missing}")
        nullable = [k for k in self.primary_key if self.columns[k].nullable]
        if nullable:
            raise ValueError(f"primary_key columns cannot be nullable: {nullable}")
        return self


class JoinSpec(_Strict):
    table: str
    join_on: list[str] = Field(
        default_factory=list, description="Join keys with the same name on both sides."
    )
    left_on: list[str] = Field(default_factory=list)
    right_on: list[str] = Field(default_factory=list)
    columns: list[str] | None = Field(None, description="Columns of the joined table to keep.")
    suffix: str = Field("", description="Appended to every kept column of the joined table.")

    @model_validator(mode="after")
    def _keys(self) -> JoinSpec:
        if bool(self.join_on) == bool(self.left_on or self.right_on):
            raise ValueError("a join needs either 'join_on' or both 'left_on' and 'right_on'")
        if len(self.left_on) != len(self.right_on):
            raise ValueError("left_on and right_on must have the same length")
        return self

    @property
    def left_keys(self) -> list[str]:
        return self.join_on or self.left_on

    @property
    def right_keys(self) -> list[str]:
        return self.join_on or self.right_on


class DerivedSpec(_Strict):
    """A feature computed from a joined row: datetime parts, a concatenation or an expression."""

    name: str
    op: Literal["hour", "weekday", "month", "dayofyear", "concat", "expr"]
    column: str | None = None
    columns: list[str] = Field(default_factory=list)
    sep: str = "-"
    expr: str | None = Field(None, description="A pandas.eval arithmetic expression over columns.")
    timezone: str | None = Field(
        None, description="Datetime parts: convert to this zone first (e.g. America/New_York)."
    )

    @model_validator(mode="after")
    def _args(self) -> DerivedSpec:
        if self.op in ("hour", "weekday", "month", "dayofyear") and not self.column:
            raise ValueError(f"derived feature {self.name!r}: op {self.op} needs 'column'")
        if self.op == "concat" and len(self.columns) < 2:
            raise ValueError(f"derived feature {self.name!r}: concat needs two or more columns")
        if self.op == "expr" and not self.expr:
            raise ValueError(f"derived feature {self.name!r}: op expr needs 'expr'")
        return self


class TargetSpec(_Strict):
    column: str
    kind: Literal["binary", "regression"]
    threshold: float | None = Field(None, description="binary: label = column > threshold.")
    name: str = Field("label", description="Name of the target column in the feature table.")

    @model_validator(mode="after")
    def _threshold(self) -> TargetSpec:
        if self.kind == "binary" and self.threshold is None:
            raise ValueError("a binary target needs a threshold (label = column > threshold)")
        return self


class FeatureSpec(_Strict):
    categorical: list[str] = Field(default_factory=list)
    numeric: list[str] = Field(default_factory=list)
    max_categories: int = Field(
        200, ge=2, description="Vocabulary size cap; rarer values map to the unknown index."
    )


def _split_boundary(name: str, text: str) -> Any:
    """A split boundary as a UTC timestamp, read as the ETL reads it (naive text is UTC)."""
    import pandas as pd  # here, not at import: the contract module stays light

    try:
        stamp = pd.Timestamp(text)
    except (ValueError, TypeError, OverflowError):
        stamp = pd.NaT
    if stamp is pd.NaT:
        raise ValueError(f"split.{name} {text!r} is not a date: use ISO 8601, e.g. '2013-10-01' "
                         "or '2013-10-01T00:00:00Z'")
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


class SplitSpec(_Strict):
    """Time-based split: explicit boundaries, or fractions of the time range's rows."""

    train_end: str | None = None
    validation_end: str | None = None
    train_fraction: float = Field(0.7, gt=0, lt=1)
    validation_fraction: float = Field(0.15, gt=0, lt=1)

    @model_validator(mode="after")
    def _consistent(self) -> SplitSpec:
        if (self.train_end is None) != (self.validation_end is None):
            raise ValueError("give both train_end and validation_end, or neither")
        if self.train_end is not None and self.validation_end is not None:
            train_end = _split_boundary("train_end", self.train_end)
            validation_end = _split_boundary("validation_end", self.validation_end)
            if train_end >= validation_end:
                raise ValueError(f"split.train_end {self.train_end!r} must be before split.validation_end "
                                 f"{self.validation_end!r}: rows between them are the validation set")
        if self.train_fraction + self.validation_fraction >= 1:
            raise ValueError("train_fraction + validation_fraction must leave rows for test")
        return self


class DatasetContract(_Strict):
    name: str
    description: str = ""
    tables: dict[str, TableSpec]
    base_table: str
    joins: list[JoinSpec] = Field(default_factory=list)
    derived: list[DerivedSpec] = Field(default_factory=list)
    target: TargetSpec
    features: FeatureSpec
    time_column: str
    split: SplitSpec = Field(default_factory=SplitSpec)

    @model_validator(mode="after")
    def _references(self) -> DatasetContract:
        if self.base_table not in self.tables:
            raise ValueError(f"base_table {self.base_table!r} is not one of {sorted(self.tables)}")
        for join in self.joins:
            if join.table not in self.tables:
                raise ValueError(f"join names unknown table {join.table!r}")
        available = set(self.joined_columns()) | {d.name for d in self.derived}
        wanted = [*self.features.categorical, *self.features.numeric, self.target.column, self.time_column]
        missing = [c for c in wanted if c not in available]
        if missing:
            raise ValueError(f"features/target/time column not produced by tables or derived: {missing}")
        return self

    @property
    def task(self) -> Literal["classification", "regression"]:
        return "classification" if self.target.kind == "binary" else "regression"

    def joined_columns(self) -> list[str]:
        """Column names after the joins (before derived features), in order."""
        cols = list(self.tables[self.base_table].columns)
        for join in self.joins:
            for col in self.join_columns(join):
                name = f"{col}{join.suffix}"
                if name in cols:
                    raise ValueError(f"join of {join.table!r} repeats column {name!r}: set a suffix")
                cols.append(name)
        return cols

    def join_columns(self, join: JoinSpec) -> list[str]:
        spec = self.tables[join.table]
        keep = join.columns if join.columns is not None else list(spec.columns)
        return [c for c in keep if c not in join.right_keys]

    def feature_tables(self) -> list[str]:
        """The tables the features read: the base table, then each joined table."""
        return [self.base_table, *(j.table for j in self.joins)]

    def base_columns_needed(self) -> list[str]:
        """Columns of the base table that features, target, time, joins or derivations read."""
        import re

        wanted = {*self.features.categorical, *self.features.numeric, self.target.column, self.time_column}
        for join in self.joins:
            wanted.update(join.left_keys)
        for spec in self.derived:
            wanted.update(c for c in (spec.column, *spec.columns) if c)
            if spec.expr:
                wanted.update(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", spec.expr))
        return [c for c in self.tables[self.base_table].columns if c in wanted]

    def fingerprint(self) -> str:
        """sha256 of the contract's canonical JSON: part of every cache key and lineage record."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()


class ContractError(FlywheelError, ValueError):
    """A dataset contract is missing or invalid."""


def load_contract(name_or_path: str | Path, datasets_dir: Path | None = None) -> DatasetContract:
    """Load a contract by name (``config/datasets/<name>.yaml``) or by path."""
    from core.settings import get_settings

    raw = _load_raw(name_or_path, datasets_dir or get_settings().datasets_dir, ())
    path = raw.pop("__path__")
    try:
        return DatasetContract.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid dataset contract {path}:\n{exc}") from None


def _merged(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``: mappings merge key by key, anything else replaces, and
    so does a mapping of another ``kind`` (a file source replaced by a stream source)."""
    out = dict(base)
    for key, value in override.items():
        merge = (isinstance(value, dict) and isinstance(out.get(key), dict)
                 and value.get("kind", out[key].get("kind")) == out[key].get("kind"))
        out[key] = _merged(out[key], value) if merge else value
    return out


def _load_raw(name_or_path: str | Path, datasets_dir: Path, seen: tuple[str, ...]) -> dict[str, Any]:
    """A contract file's mapping, with ``extends: <contract>`` resolved: the named contract
    (same folder) with this file's fields on top, so a variant states only what differs."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = datasets_dir / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ContractError(f"dataset contract {str(name_or_path)!r} not found at {path}; known: {known}")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ContractError(f"cannot read dataset contract {path}: {exc}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ContractError(_yaml_problem(path, text, exc)) from None
    if not isinstance(raw, dict):
        got = "an empty file" if raw is None else f"a {type(raw).__name__} ({str(raw)[:60]!r})"
        raise ContractError(f"invalid dataset contract {path}: expected a mapping of fields "
                            f"(name:, tables:, base_table:, ...), got {got}")
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ContractError(f"invalid dataset contract {path}: extends must name another contract")
        if parent in seen or parent == path.stem:
            raise ContractError(f"invalid dataset contract {path}: extends {parent!r} goes in a circle "
                                f"({' -> '.join((*seen, path.stem, parent))})")
        base = _load_raw(parent, path.parent, (*seen, path.stem))
        base.pop("__path__")
        raw = _merged(base, raw)
    raw["__path__"] = str(path)
    return raw


def _yaml_problem(path: Path, text: str, exc: yaml.YAMLError) -> str:
    """A YAML syntax error in a few lines: the file, line and column, the problem, the line."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    context, context_mark = getattr(exc, "context", None), getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} at line {context_mark.line + 1}, column {context_mark.column + 1})"
    elif context:
        problem += f" ({context})"
    if mark is None:
        return f"invalid YAML in dataset contract {path}: {problem}"
    message = f"invalid YAML in dataset contract {path}, line {mark.line + 1}, column {mark.column + 1}: {problem}"
    lines = text.splitlines()
    if mark.line < len(lines):
        message += f"\n    {lines[mark.line]}\n    {' ' * mark.column}^"
    return message


_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def expand(value: str) -> str:
    """Expand ``${VARS}`` from the environment; an unset variable is an error naming it, rather
    than an empty string. Only the braced form is expanded: a bare ``$`` (an OData ``$filter``,
    a password) is left alone. The error shows the template with credentials masked, never
    the value of any variable."""
    unset = sorted({name for name in _VARIABLE.findall(value) if name not in os.environ})
    if unset:
        names = ", ".join(f"${{{name}}}" for name in unset)
        raise ContractError(f"unset environment variable {names} in {mask_text(value)!r}")
    if "${" in _VARIABLE.sub("", value):
        raise ContractError(f"malformed ${{...}} reference in {mask_text(value)!r}: use ${{NAME}}")
    return _VARIABLE.sub(lambda match: os.environ[match[1]], value)
