"""The validation gate: Great Expectations suites built from the dataset contract.

``validate(batch, table, spec, docs_root)`` returns a ``ValidationResult`` (a decision, not an
action): accepted rows, quarantined rows with their reasons, and whether the whole batch is
rejected, with the failed expectations named. The flow decides what to write and whether to fail.

Expectations come in two levels. Table-level ones (columns present with the right types, null
share within limits, at least one row, custom table checks) reject the batch whole. Row-level
ones (not null, ranges, allowed values, unique keys, custom row checks) send the failing rows to
quarantine; a batch whose quarantined share is above the contract's limit is rejected whole.
Invariant: rows_in == len(accepted) + len(quarantined) whenever the batch is not rejected.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from core.contract import TableSpec

log = logging.getLogger(__name__)

REASON_COLUMN = "_flywheel_reasons"
LEVEL = "flywheel_level"

# Type names Great Expectations observes for pandas columns (dtype names, or the element
# type names of object columns).
TYPE_LISTS: dict[str, list[str]] = {
    "int": ["int64", "int32", "int16", "int8", "Int64", "Int32", "uint8", "uint16", "uint32", "int"],
    "float": ["float64", "float32", "Float64", "int64", "int32", "Int64", "float", "int"],
    "str": ["StringDtype", "str", "string"],
    "bool": ["bool", "boolean"],
    # Datetimes are checked as naive UTC: GX cannot match tz-aware dtypes in a type list.
    "datetime": ["datetime64[ns]", "datetime64[us]", "datetime64[ms]", "datetime64[s]"],
}


@dataclass
class Failure:
    """One failed expectation, in words a person can act on."""

    expectation: str
    column: str | None
    level: str
    message: str
    unexpected_count: int = 0

    def __str__(self) -> str:
        return self.message


@dataclass
class ValidationResult:
    table: str
    rows_in: int
    accepted: pd.DataFrame
    quarantined: pd.DataFrame
    rejected: bool
    failures: list[Failure] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    evaluated: int = 0
    data_docs: Path | None = None
    seconds: float = 0.0

    @property
    def bad_row_fraction(self) -> float:
        return len(self.quarantined) / self.rows_in if self.rows_in else 0.0

    def describe_failures(self) -> str:
        return "; ".join(str(f) for f in self.failures) or "none"

    def summary_row(self) -> dict[str, Any]:
        return {
            "table": self.table,
            "rows_in": self.rows_in,
            "accepted": len(self.accepted),
            "quarantined": len(self.quarantined),
            "status": "REJECTED" if self.rejected else "passed",
            "failed expectations": self.describe_failures(),
        }


class ValidationError(RuntimeError):
    """One or more batches were rejected by the gate."""

    def __init__(self, results: list[ValidationResult]):
        self.results = results
        lines = [f"{r.table}: rejected ({r.rows_in} rows): {r.describe_failures()}" for r in results]
        docs = {str(r.data_docs) for r in results if r.data_docs}
        tail = f"\nData Docs: {', '.join(sorted(docs))}" if docs else ""
        super().__init__("validation gate rejected the batch:\n  " + "\n  ".join(lines) + tail)


def conform(batch: pd.DataFrame, spec: TableSpec) -> tuple[pd.DataFrame, list[Failure], list[str]]:
    """Match a raw batch to the contract's schema before the expectations run.

    Drops (or rejects) extra columns, parses datetime columns to UTC, turns integral float
    columns into nullable ints and all-null columns into the contract's type. A column that
    cannot be brought to its type is left as it is, so the type expectation fails and names it.
    """
    failures: list[Failure] = []
    warnings: list[str] = []
    frame = batch.copy(deep=False)  # columns are replaced, never modified in place
    frame.columns = [str(c) for c in frame.columns]
    expected = list(spec.columns)
    missing = [c for c in expected if c not in frame.columns]
    extra = [c for c in frame.columns if c not in spec.columns]
    if missing:
        hint = f" (the batch has unexpected columns {extra}: renamed?)" if extra else ""
        for column in missing:
            failures.append(Failure("expect_column_to_exist", column, "table",
                                    f"column {column!r} is missing{hint}"))
    if extra:
        if spec.extra_columns == "reject":
            failures.append(Failure("expect_table_columns_to_match_set", None, "table",
                                    f"unexpected columns {extra} (contract: extra_columns: reject)"))
        else:
            warnings.append(f"dropped columns not in the contract: {extra}")
            frame = frame.drop(columns=extra)
    for name, col in spec.columns.items():
        if name not in frame.columns:
            continue
        series = frame[name]
        if series.isna().all():
            frame[name] = _empty_as(col.type, len(series), series.index)
            continue
        if col.type == "datetime":
            frame[name] = _to_utc(series)
        elif col.type == "int" and pd.api.types.is_float_dtype(series):
            values = series.dropna()
            if (values % 1 == 0).all():
                frame[name] = series.astype("Int64")
        elif col.type == "str" and pd.api.types.infer_dtype(series, skipna=True) == "string":
            # A string dtype lets the type expectation check the dtype once instead of every
            # value (half the gate's time on flights); mixed columns stay object and fail it.
            frame[name] = series.astype("string")
    return frame, failures, warnings


def _empty_as(kind: str, length: int, index: pd.Index) -> pd.Series:
    dtype = {"int": "Int64", "float": "float64", "str": object, "bool": "boolean",
             "datetime": "datetime64[ns]"}[kind]
    return pd.Series([None] * length, index=index, dtype=dtype)


def _to_utc(series: pd.Series) -> pd.Series:
    """Datetimes as naive UTC (``datetime64``); the lake stores them tz-aware UTC."""
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC").dt.tz_localize(None)
    if pd.api.types.is_datetime64_dtype(series):
        return series
    if not (pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)):
        return series  # numbers are not timestamps: the type expectation names the column
    parsed = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
    if (parsed.isna() & series.notna()).any():
        return series  # some values are not datetimes: leave them for the type expectation
    return parsed.dt.tz_localize(None)


def _expectation_class(snake: str) -> Any:
    import great_expectations.expectations as gxe

    camel = "".join(part.capitalize() for part in snake.split("_"))
    cls = getattr(gxe, camel, None)
    if cls is None:
        raise ValueError(f"unknown Great Expectations expectation {snake!r}")
    return cls


def build_expectations(spec: TableSpec, present: list[str]) -> list[Any]:
    """The suite's expectations for a table, each tagged table- or row-level in its meta."""
    import great_expectations.expectations as gxe

    table = {LEVEL: "table"}
    row = {LEVEL: "row"}
    out: list[Any] = [
        gxe.ExpectTableRowCountToBeBetween(min_value=1, meta=table),
        # One expectation for every contract column being present (extra ones are handled by
        # conform): cheaper than one ExpectColumnToExist per column, same Data Docs row.
        gxe.ExpectTableColumnsToMatchSet(column_set=list(spec.columns), exact_match=False, meta=table),
    ]
    for name, col in spec.columns.items():
        if name not in present:
            continue  # the column-set check names it; other checks would only error
        out.append(gxe.ExpectColumnValuesToBeInTypeList(
            column=name, type_list=TYPE_LISTS[col.type], meta=table))
        if not col.nullable:
            out.append(gxe.ExpectColumnValuesToNotBeNull(column=name, meta=row))
        elif col.max_null_fraction < 1:
            out.append(gxe.ExpectColumnValuesToNotBeNull(
                column=name, mostly=round(1 - col.max_null_fraction, 6), meta=table))
        if col.min is not None or col.max is not None:
            out.append(gxe.ExpectColumnValuesToBeBetween(
                column=name, min_value=col.min, max_value=col.max, meta=row))
        if col.allowed is not None:
            out.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=col.allowed, meta=row))
    keys = [k for k in spec.primary_key if k in present]
    if len(keys) == 1:
        out.append(gxe.ExpectColumnValuesToBeUnique(column=keys[0], meta=row))
    elif keys:
        out.append(gxe.ExpectCompoundColumnsToBeUnique(column_list=keys, meta=row))
    for custom in spec.custom_expectations:
        out.append(_expectation_class(custom.type)(**custom.kwargs, meta={LEVEL: custom.level}))
    return out


_contexts: dict[str, Any] = {}


def gx_context(root: Path | None) -> Any:
    """A Great Expectations context: file-backed under ``root`` (Data Docs persist there), or
    in memory when ``root`` is None. One per process and root."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx

    key = str(root)
    if key not in _contexts:
        if root is None:
            context = gx.get_context(mode="ephemeral")
        else:
            root.mkdir(parents=True, exist_ok=True)
            context = gx.get_context(mode="file", project_root_dir=str(root))
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        _contexts[key] = context
    return _contexts[key]


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _batch_definition(context: Any, asset_name: str) -> Any:
    try:
        source = context.data_sources.get("flywheel")
    except Exception:  # noqa: BLE001 - GX raises several types for "not found"
        source = context.data_sources.add_pandas("flywheel")
    try:
        asset = source.get_asset(asset_name)
    except Exception:  # noqa: BLE001
        asset = source.add_dataframe_asset(asset_name)
    try:
        return asset.get_batch_definition("whole")
    except Exception:  # noqa: BLE001
        return asset.add_batch_definition_whole_dataframe("whole")


RESULT_FORMAT = {"result_format": "COMPLETE", "partial_unexpected_count": 5,
                 "return_unexpected_index_query": False}


def run_suite(frame: pd.DataFrame, suite_name: str, expectations: list[Any]) -> Any:
    """Validate a frame in memory; nothing is stored (fast path for every batch)."""
    import great_expectations as gx

    name = _safe_name(suite_name)
    batch = _batch_definition(gx_context(None), name).get_batch(batch_parameters={"dataframe": frame})
    return batch.validate(gx.ExpectationSuite(name=name, expectations=expectations),
                          result_format=RESULT_FORMAT)


def write_data_docs(frame: pd.DataFrame, suite_name: str, expectations: list[Any], root: Path) -> Path:
    """Validate again through a stored suite and checkpoint so Data Docs render the result.

    Storing results costs seconds on large batches, so the gate does it only for batches
    that failed, where a person needs the report.
    """
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction

    context = gx_context(root)
    name = _safe_name(suite_name)
    definition = context.validation_definitions.add_or_update(gx.ValidationDefinition(
        name=name, data=_batch_definition(context, name),
        suite=context.suites.add_or_update(gx.ExpectationSuite(name=name, expectations=expectations))))
    checkpoint = context.checkpoints.add_or_update(gx.Checkpoint(
        name=name, validation_definitions=[definition],
        actions=[UpdateDataDocsAction(name="data_docs")],
        result_format={"result_format": "SUMMARY"}))
    checkpoint.run(batch_parameters={"dataframe": frame})
    return root / "gx" / "uncommitted" / "data_docs" / "local_site" / "index.html"


def _describe(config: dict[str, Any], result: dict[str, Any], exception: str | None) -> str:
    kind = config["type"]
    kwargs = config.get("kwargs", {})
    column = kwargs.get("column") or kwargs.get("column_list")
    count = result.get("unexpected_count")
    sample = result.get("partial_unexpected_list") or []
    if exception:
        return f"{kind}({column}) could not run: {exception}"
    if kind == "expect_table_row_count_to_be_between":
        return f"{kind}: the batch has {result.get('observed_value')} rows"
    if kind == "expect_column_values_to_be_in_type_list":
        observed = result.get("observed_value") or sorted({type(v).__name__ for v in sample})
        return f"{kind}({column}): expected {kwargs.get('type_list', [])[:1]}-like values, got {observed}"
    if kind == "expect_column_values_to_not_be_null" and kwargs.get("mostly"):
        share = result.get("unexpected_percent", 0.0)
        return f"{kind}({column}): {share:.1f}% nulls, above the limit {100 * (1 - kwargs['mostly']):.1f}%"
    detail = ""
    if "min_value" in kwargs or "max_value" in kwargs:
        detail = f" outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
    elif "value_set" in kwargs:
        detail = " not in the allowed set"
    shown = ", ".join(repr(v) for v in sample[:3])
    return f"{kind}({column}): {count} rows{detail} (e.g. {shown})"


def validate(batch: pd.DataFrame, table: str, spec: TableSpec, docs_root: Path | None = None,
             suite_prefix: str = "") -> ValidationResult:
    """Check a batch against its table contract; split it into accepted and quarantined rows."""
    started = time.perf_counter()
    frame, failures, warnings = conform(batch.reset_index(drop=True), spec)
    expectations = build_expectations(spec, [c for c in spec.columns if c in frame.columns])
    validation = run_suite(frame, f"{suite_prefix}{table}", expectations)

    reasons: dict[int, list[str]] = defaultdict(list)
    for item in validation.results:
        expectation = item.expectation_config
        config = {"type": expectation.type, "kwargs": dict(expectation.kwargs)}
        level = (expectation.meta or {}).get(LEVEL, "row")
        exception = _exception_message(item.exception_info or {})
        if item.success and not exception:
            continue
        result = item.result or {}
        column = config["kwargs"].get("column")
        message = _describe(config, result, exception)
        already = any(f.expectation == config["type"] and f.column == column for f in failures) or (
            config["type"] == "expect_table_columns_to_match_set"
            and any(f.expectation == "expect_column_to_exist" for f in failures))
        if level == "table" or exception:
            if not already:
                failures.append(Failure(config["type"], column, "table", message,
                                        int(result.get("unexpected_count") or 0)))
            continue
        short = config["type"].removeprefix("expect_")
        label = f"{short}({column or ','.join(config['kwargs'].get('column_list', []))})"
        for index in result.get("unexpected_index_list") or []:
            reasons[int(index)].append(label)
        failures.append(Failure(config["type"], column, "row", message,
                                int(result.get("unexpected_count") or 0)))

    bad_index = np.fromiter(reasons.keys(), dtype=np.int64, count=len(reasons))
    bad_mask = np.zeros(len(frame), dtype=bool)
    bad_mask[bad_index] = True
    quarantined = frame[bad_mask].copy()
    quarantined[REASON_COLUMN] = ["; ".join(reasons[i]) for i in quarantined.index]
    accepted = frame[~bad_mask]
    table_failed = any(f.level == "table" for f in failures)
    share = len(quarantined) / len(frame) if len(frame) else 0.0
    if not table_failed and share > spec.max_bad_row_fraction:
        failures.insert(0, Failure(
            "max_bad_row_fraction", None, "table",
            f"{len(quarantined)} of {len(frame)} rows ({share:.2%}) broke row-level expectations, "
            f"above the contract's limit of {spec.max_bad_row_fraction:.2%}"))
        table_failed = True
    docs = None
    if table_failed and docs_root is not None:
        docs = write_data_docs(frame, f"{suite_prefix}{table}", expectations, docs_root)
    result = ValidationResult(
        table=table, rows_in=len(batch), accepted=accepted, quarantined=quarantined,
        rejected=table_failed, failures=failures, warnings=warnings,
        evaluated=len(validation.results), data_docs=docs,
        seconds=time.perf_counter() - started)
    if not result.rejected:
        assert result.rows_in == len(accepted) + len(quarantined), "rows in != accepted + quarantined"
    return result


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX reports errors either flat or keyed by metric id; return the first message."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None
