"""Dataset contracts: what a dataset's tables are, how to read, check, join and featurize them.

A new tabular dataset is onboarded by writing ``config/datasets/<name>.yaml``; the flows read
everything they need from the contract and nothing dataset-specific lives in code.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

ColumnType = Literal["int", "float", "str", "bool", "datetime"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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

    @model_validator(mode="after")
    def _nulls(self) -> ColumnSpec:
        if self.max_null_fraction > 0 and not self.nullable:
            raise ValueError("max_null_fraction > 0 needs nullable: true")
        return self


class FileSource(_Strict):
    kind: Literal["file"]
    path: str = Field(
        description="Local path, fsspec URL (s3://, https://, memory://) or "
        "package://<python package>/<file inside it>. ${VARS} are expanded."
    )
    format: Literal["csv", "parquet", "auto"] = "auto"
    read_options: dict[str, Any] = Field(default_factory=dict)
    storage_options: dict[str, Any] = Field(default_factory=dict)


class SqlSource(_Strict):
    kind: Literal["sql"]
    url: str = Field(description="SQLAlchemy URL; ${VARS} are expanded so secrets stay in the env.")
    query: str
    chunk_rows: int = Field(100_000, ge=1)


class HttpSource(_Strict):
    kind: Literal["http"]
    url: str
    records_path: str = Field("data", description="Key of the list of records in each page.")
    next_path: str | None = Field(
        "next", description="Key holding the next page's URL (null when done)."
    )
    page_param: str | None = Field(
        None, description="Alternative paging: a page-number query parameter, until an empty page."
    )
    params: dict[str, Any] = Field(default_factory=dict)
    headers_from_env: dict[str, str] = Field(
        default_factory=dict, description="Header name -> environment variable holding its value."
    )
    timeout_s: float = Field(10.0, gt=0)
    retries: int = Field(4, ge=0)
    backoff_s: float = Field(0.5, ge=0)
    max_pages: int = Field(10_000, ge=1)


Source = Annotated[FileSource | SqlSource | HttpSource, Field(discriminator="kind")]


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

    @model_validator(mode="after")
    def _keys_are_columns(self) -> TableSpec:
        missing = [k for k in self.primary_key if k not in self.columns]
        if missing:
            raise ValueError(f"primary_key names columns not declared: {missing}")
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


class ContractError(ValueError):
    """A dataset contract is missing or invalid."""


def load_contract(name_or_path: str | Path, datasets_dir: Path | None = None) -> DatasetContract:
    """Load a contract by name (``config/datasets/<name>.yaml``) or by path."""
    from core.settings import get_settings

    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = (datasets_dir or get_settings().datasets_dir) / f"{name_or_path}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise ContractError(f"dataset contract {str(name_or_path)!r} not found at {path}; known: {known}")
    raw = yaml.safe_load(path.read_text())
    try:
        return DatasetContract.model_validate(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid dataset contract {path}:\n{exc}") from None


def expand(value: str) -> str:
    """Expand ${VARS}; an unset variable is an error rather than an empty string."""
    expanded = os.path.expandvars(value)
    if "${" in expanded:
        raise ContractError(f"unset environment variable in {value!r}")
    return expanded
