"""The validation gate: Great Expectations suites built from the dataset contract.

``validate(batch, table, spec, docs_root, suite_prefix, source)`` returns a ``ValidationResult``
(a decision, not an action): accepted rows, quarantined rows with their reasons, and whether the
whole batch is rejected, with the failed expectations named. The flow decides what to write and
whether to fail.

Expectations come in two levels. Table-level ones (columns present with the right types, null
share within limits, at least one row, custom table checks) reject the batch whole. Row-level
ones (not null, ranges, allowed values, unique keys, finite numbers, custom row checks) send the
failing rows to quarantine; a batch whose quarantined share is above the contract's limit is
rejected whole. Every message names the column and, for values, the first offending rows by their
position in the batch (counted from 0) with their values.

Great Expectations runs the suite in two passes over one validator (``run_suite``): first one
combined expectation (``core.gx_checks``) that decides most of the contract's checks at once,
beside the few it cannot (row count, column set, keys, custom ones); then only the contract's
own expectations that failed, with the result format that names their rows. The reasons, the
messages and the Data Docs of a rejected batch come from the contract's own expectations.

Invariant, checked on every result (not with ``assert``, which ``python -O`` removes):
rows_in == len(accepted) + len(quarantined).
"""

from __future__ import annotations

import copy
import os
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from core.contract import CONTROL_CHARACTERS
from core.errors import FlywheelError

if TYPE_CHECKING:
    from core.contract import TableSpec


REASON_COLUMN = "_flywheel_reasons"
LEVEL = "flywheel_level"

# Type names Great Expectations observes for pandas columns (dtype names, or the element
# type names of object columns). GX matches pandas' nullable dtypes only by their class names
# ("Int64Dtype"), so conform's Int64 columns need those; "Int64" is str(dtype), for plain checks.
TYPE_LISTS: dict[str, list[str]] = {
    "int": ["int64", "int32", "int16", "int8", "Int64", "Int32", "Int64Dtype", "Int32Dtype",
            "uint8", "uint16", "uint32", "int"],
    "float": ["float64", "float32", "Float64", "Float64Dtype", "int64", "int32", "Int64",
              "Int64Dtype", "float", "int"],
    "str": ["StringDtype", "str", "string"],
    "bool": ["bool", "boolean", "BooleanDtype"],
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
    evaluated: int = 0  # the contract's expectations decided on the batch
    first_pass: int = 0  # Great Expectations expectations run to decide them (one combines most)
    data_docs: Path | None = None
    seconds: float = 0.0
    source: str = ""  # where the batch came from, as the caller described it (secrets masked)

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


def check_invariant(result: ValidationResult) -> None:
    """Every row that came in was accepted or quarantined, once.

    An explicit check rather than an ``assert``: ``python -O`` removes asserts, and a gate that
    loses rows silently would corrupt the lake.
    """
    kept = len(result.accepted) + len(result.quarantined)
    if result.rows_in != kept:
        raise RuntimeError(
            f"{result.table}: the gate lost rows: {result.rows_in} rows in, but {len(result.accepted)} "
            f"accepted + {len(result.quarantined)} quarantined = {kept} (a bug in the gate, not the data)")


class ValidationError(FlywheelError):
    """One or more batches were rejected by the gate."""

    def __init__(self, results: list[ValidationResult]):
        self.results = results
        lines = [f"{r.table}{f' from {r.source}' if r.source else ''}: rejected ({r.rows_in} rows): "
                 f"{r.describe_failures()}" for r in results]
        docs = {str(r.data_docs) for r in results if r.data_docs}
        tail = f"\nData Docs: {', '.join(sorted(docs))}" if docs else ""
        super().__init__("validation gate rejected the batch:\n  " + "\n  ".join(lines) + tail)


def conform(batch: pd.DataFrame, spec: TableSpec) -> tuple[pd.DataFrame, list[Failure], list[str]]:
    """Match a raw batch to the contract's schema before the expectations run.

    Drops (or rejects) extra columns, parses datetime columns to UTC, turns integral float
    columns into nullable ints (inf and -inf become missing there: the gate quarantines them as
    non-finite) and all-null columns into the contract's type. A column that cannot be brought
    to its type is left as it is and named here, with its first offending rows and values where
    they can be found, or else by the type expectation.
    """
    failures: list[Failure] = []
    warnings: list[str] = []
    frame = batch.copy(deep=False)  # columns are replaced, never modified in place
    frame.columns = [str(c) for c in frame.columns]
    missing = [c for c in spec.columns if c not in frame.columns]
    extra = [c for c in frame.columns if c not in spec.columns]
    if missing:
        failures.append(_missing_columns(missing, extra, list(frame.columns), spec))
    if extra:
        if spec.extra_columns == "reject":
            if not missing:  # otherwise the missing-columns failure names them already
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
            frame[name], unparsed = _to_utc(series, col.timezone)
            if unparsed is not None:
                failures.append(_type_failure(name, col.type, series, unparsed, ("a datetime", "datetimes")))
        elif col.type in ("int", "float") and _is_text(series):
            failure = _text_in_number_column(name, col.type, series)
            if failure is not None:
                failures.append(failure)
        elif col.type == "int" and pd.api.types.is_float_dtype(series):
            values = series.to_numpy(dtype="float64", na_value=np.nan)
            finite = np.isfinite(values)
            with np.errstate(invalid="ignore"):
                fractional = finite & (np.mod(values, 1) != 0)
            if fractional.any():
                failures.append(_type_failure(name, col.type, series, fractional,
                                              ("a whole number", "whole numbers")))
            else:
                frame[name] = series.where(finite).astype("Int64")
        elif col.type == "str" and pd.api.types.infer_dtype(series, skipna=True) == "string":
            # A string dtype lets the type expectation check the dtype once instead of every
            # value (half the gate's time on flights); mixed columns stay object and fail it.
            frame[name] = series.astype("string")
    return frame, failures, warnings


# Delimiters a CSV is often written with instead of ',' (name in words, value in YAML).
_DELIMITERS = {";": ("';'", "';'"), "\t": ("tab", '"\\t"'), "|": ("'|'", "'|'")}


def _missing_columns(missing: list[str], extra: list[str], present: list[str], spec: TableSpec) -> Failure:
    """One failure for all missing columns, with the likeliest cause when it can be told."""
    names = ", ".join(repr(c) for c in missing)
    what = f"column {names} is missing" if len(missing) == 1 else f"{len(missing)} columns are missing: {names}"
    hint = f" (the batch has unexpected columns {extra}: renamed?)" if extra else ""
    if len(present) == 1:
        header = present[0]
        for sep, (word, in_yaml) in _DELIMITERS.items():
            parts = {p.strip().strip("'\"") for p in header.split(sep)} if sep in header else set()
            if parts & set(spec.columns):
                hint = f": the file looks {word}-delimited: set read_options: {{sep: {in_yaml}}} in the contract"
                break
    return Failure("expect_column_to_exist", None, "table", what + hint, len(missing))


def _is_text(series: pd.Series) -> bool:
    return pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)


def _text_in_number_column(name: str, kind: str, series: pd.Series) -> Failure | None:
    """The values of a text column that are not numbers; None when every value reads as one
    (the type expectation then names the column)."""
    try:
        numbers = pd.to_numeric(series, errors="coerce")
    except (TypeError, ValueError):  # values pandas cannot even try (lists, dicts)
        return None
    bad = (numbers.isna() & series.notna()).to_numpy(dtype=bool)
    if not bad.any():
        return None
    return _type_failure(name, kind, series, bad, ("a number", "numbers"))


def _type_failure(name: str, kind: str, series: pd.Series, bad: np.ndarray,
                  nouns: tuple[str, str]) -> Failure:
    """'column 'x' (float): 3 values are not numbers, first at rows 2, 7, 9: 'n/a', 'abc', '--''."""
    positions = np.flatnonzero(bad)
    count = len(positions)
    what = f"1 value is not {nouns[0]}" if count == 1 else f"{count} values are not {nouns[1]}"
    return Failure("expect_column_values_to_be_in_type_list", name, "table",
                   f"column {name!r} ({kind}): {what}, {_where(positions, [series])}", count)


MAX_ROWS_SHOWN = 5


def _where(positions: Any, columns: list[pd.Series]) -> str:
    """'first at rows 2, 7, 9: 'n/a', 'abc', '--'': the first offending row positions (up to
    five) and their values in ``columns`` (a tuple per row when there are several)."""
    positions = np.asarray(positions, dtype=np.int64)
    if len(positions) > MAX_ROWS_SHOWN:  # the smallest few without sorting them all
        positions_shown = np.partition(positions, MAX_ROWS_SHOWN - 1)[:MAX_ROWS_SHOWN]
    else:
        positions_shown = positions
    first = np.sort(positions_shown)
    rows = ", ".join(str(int(p)) for p in first)
    where = f"at row {rows}" if len(positions) == 1 else f"first at rows {rows}"
    if not columns:
        return where
    picked = [c.iloc[first].tolist() for c in columns]
    if len(picked) == 1:
        values = [_show(v) for v in picked[0]]
    else:
        values = ["(" + ", ".join(_show(v) for v in row) + ")" for row in zip(*picked, strict=True)]
    return f"{where}: {', '.join(values)}"


def _show(value: Any) -> str:
    """A value as a person would write it: quoted text, plain numbers, 'null'."""
    if value is None or value is pd.NA or value is pd.NaT or (isinstance(value, float) and np.isnan(value)):
        return "null"
    if isinstance(value, pd.Timestamp):
        return str(value)
    if isinstance(value, np.generic):
        value = value.item()
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _empty_as(kind: str, length: int, index: pd.Index) -> pd.Series:
    dtype = {"int": "Int64", "float": "float64", "str": object, "bool": "boolean",
             "datetime": "datetime64[ns]"}[kind]
    return pd.Series([None] * length, index=index, dtype=dtype)


# A time zone written after a time: Z, +01:00, -0500, +01, UTC or GMT.
ZONE_PATTERN = r"\d:\d{2}(?::\d{2}(?:[.,]\d+)?)?\s*(?:[zZ]|[+-]\d{2}(?::?\d{2})?|UTC|GMT)$"


def _zoned(series: pd.Series) -> np.ndarray:
    """Text datetimes: the mask of values that say their time zone (nulls count as zoned).

    Each distinct value is searched once (a batch repeats its timestamps: flights has one per
    hour), then the answers are spread back over the rows. Values that compare equal share an
    answer: numbers (1, 1.0, True) never name a zone, equal datetimes all do or all do not."""
    try:
        codes, distinct = pd.factorize(series, use_na_sentinel=True)
    except TypeError:  # unhashable values: search every one
        codes, distinct = np.arange(len(series)), series.to_numpy()
    zoned = (pd.Series(distinct, dtype=object).astype("string").str.strip()
             .str.contains(ZONE_PATTERN, regex=True, na=True).to_numpy(dtype=bool))
    return np.where(codes < 0, True, zoned[np.maximum(codes, 0)]) if len(zoned) else codes < 0


def _to_utc(series: pd.Series, timezone: str | None = None) -> tuple[pd.Series, np.ndarray | None]:
    """Datetimes as naive UTC (``datetime64``); the lake stores them tz-aware UTC. A value
    without a zone is read in ``timezone`` where the contract declares one, else as UTC (the
    gate quarantines zoneless text then: see ``zoneless_rows``).

    Returns the converted series and, for text that does not all parse, the series unchanged
    with the mask of the values that do not.
    """
    if isinstance(series.dtype, pd.DatetimeTZDtype):
        return series.dt.tz_convert("UTC").dt.tz_localize(None), None
    if pd.api.types.is_datetime64_dtype(series):
        return (series if timezone is None else _localized(series, timezone)), None
    if not _is_text(series):
        return series, None  # numbers are not timestamps: the type expectation names the column
    parsed = pd.to_datetime(series, utc=True, errors="coerce", format="mixed")
    if timezone is not None:
        naive = ~_zoned(series)
        if naive.any():
            local = pd.to_datetime(series[naive], errors="coerce", format="mixed")
            if isinstance(local.dtype, pd.DatetimeTZDtype):  # pandas found a zone after all
                local = local.dt.tz_convert("UTC").dt.tz_localize(None)
            else:
                local = _localized(local, timezone)
            parsed = parsed.dt.tz_localize(None).copy()  # a copy: .dt results warn on assignment
            parsed[naive] = local
            parsed = parsed.dt.tz_localize("UTC")
    unparsed = (parsed.isna() & series.notna()).to_numpy(dtype=bool)
    if unparsed.any():
        return series, unparsed  # leave the text for the type expectation to fail on
    return parsed.dt.tz_localize(None), None


def _localized(naive: pd.Series, timezone: str) -> pd.Series:
    """Naive local times in ``timezone`` as naive UTC; a time that does not exist or is
    ambiguous there (the clock change) becomes missing, and the gate names it."""
    return naive.dt.tz_localize(timezone, ambiguous="NaT", nonexistent="NaT").dt.tz_convert("UTC").dt.tz_localize(None)


def zoneless_rows(batch: pd.DataFrame, spec: TableSpec) -> dict[str, np.ndarray]:
    """Per datetime column given as text, the mask of rows whose value names no time zone
    ('2013-01-01 05:00:00'): read as UTC, a time written in New York would be five hours off,
    silently. Columns that declare ``timezone`` (the zone to assume) are not checked."""
    names = {str(c): c for c in batch.columns}
    masks: dict[str, np.ndarray] = {}
    for name, col in spec.columns.items():
        if col.type != "datetime" or col.timezone is not None or name not in names:
            continue
        series = batch[names[name]]
        if not _is_text(series):
            continue
        hit = ~_zoned(series)
        if hit.any():
            masks[name] = hit
    return masks


def non_finite_rows(batch: pd.DataFrame, spec: TableSpec) -> dict[str, np.ndarray]:
    """Per number column, the mask of rows holding inf or -inf (NaN is a null, not counted).

    Read from the batch before ``conform``, which turns inf into a missing value in int columns.
    Columns with ``allow_non_finite: true`` are not checked.
    """
    names = {str(c): c for c in batch.columns}
    masks: dict[str, np.ndarray] = {}
    for name, col in spec.columns.items():
        if col.type not in ("int", "float") or col.allow_non_finite or name not in names:
            continue
        series = batch[names[name]]
        if isinstance(series, pd.Series) and pd.api.types.is_float_dtype(series):
            hit = np.isinf(series.to_numpy(dtype="float64", na_value=np.nan))
            if hit.any():
                masks[name] = hit
    return masks


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
            # A str bound is an ISO date for a datetime column; GX parses it, its stubs do not say so.
            bounds: dict[str, Any] = {"min_value": col.min, "max_value": col.max}
            out.append(gxe.ExpectColumnValuesToBeBetween(column=name, **bounds, meta=row))
        if col.allowed is not None:
            out.append(gxe.ExpectColumnValuesToBeInSet(column=name, value_set=col.allowed, meta=row))
        if col.type == "str" and col.allowed is None:  # an allowed set already refuses them
            out.append(gxe.ExpectColumnValuesToNotMatchRegex(column=name, regex=CONTROL_CHARACTERS, meta=row))
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
        context: Any
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
# The first pass: observed values (the combined expectation's broken checks), but no unexpected
# values or row indices for the map expectations that run in it.
FIRST_PASS_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 0}


def plan_first_pass(expectations: list[Any], frame: pd.DataFrame) -> tuple[list[Any], dict[int, Any]]:
    """The first pass of a suite on this frame: one ``ExpectTableToPassChecks`` standing for
    every standard expectation it can decide (see ``core.gx_checks``), then those it cannot,
    as they are. Returns the first pass and the standard expectations the combined one stands
    for, by the check ids it names them with."""
    from core.gx_checks import ExpectTableToPassChecks, combinable, dump_checks

    checks: list[dict[str, Any]] = []
    covered: dict[int, Any] = {}
    alone: list[Any] = []
    for expectation in expectations:
        check = combinable(expectation, frame)
        if check is None:
            alone.append(expectation)
        else:
            covered[len(checks)] = expectation
            checks.append({"id": len(checks), **check})
    if not checks:
        return alone, {}
    return [ExpectTableToPassChecks(checks=dump_checks(checks), meta={LEVEL: "table"}), *alone], covered


def run_suite(frame: pd.DataFrame, suite_name: str, expectations: list[Any]) -> tuple[int, list[Any]]:
    """Validate a frame in memory (nothing is stored): the number of Great Expectations
    expectations of the first pass, and the results of the contract's expectations that
    failed, with their rows named.

    Great Expectations' cost is mostly a fixed few milliseconds per expectation, whatever the
    batch's size, so the first pass is short: one combined expectation decides every check it
    can (types, not null and null shares, ranges, allowed sets, control characters: see
    ``plan_first_pass``), beside those it cannot (row count, column set, keys, custom ones).
    It runs with ``BASIC`` and no unexpected values: the combined expectation's observed value
    names the checks that broke, the others gather nothing. Only the contract's expectations
    that failed run again, with ``COMPLETE``, which names the rows to quarantine: a clean batch
    pays the first pass only. Both passes share one validator, so Great Expectations loads the
    batch (and fingerprints it, a hash of every row) once."""
    import great_expectations as gx
    from great_expectations.validator.v1_validator import Validator

    from core.gx_checks import EXPECTATION_TYPE

    name = _safe_name(suite_name)
    first_pass, covered = plan_first_pass(expectations, frame)
    validator = Validator(batch_definition=_batch_definition(gx_context(None), name),
                          batch_parameters={"dataframe": frame}, result_format=FIRST_PASS_FORMAT)
    first = validator.validate_expectation_suite(gx.ExpectationSuite(name=name, expectations=first_pass))
    failed: list[Any] = []
    for item in first.results:
        raised = _exception_message(item.exception_info or {}) is not None
        if item.success and not raised:
            continue
        config = item.expectation_config
        if config is None:  # Great Expectations always names it; never accept a batch unread
            raise RuntimeError(f"{suite_name}: Great Expectations returned a failed result without its expectation")
        if config.type != EXPECTATION_TYPE:
            failed.append(config.to_domain_obj())
            continue
        # The checks that broke, by their ids; all those it stands for where it could not run.
        observed = (item.result or {}).get("observed_value")
        broken = [int(i) for i in observed] if isinstance(observed, list) and not raised else list(covered)
        if not broken:  # failed without naming a check: all it stands for, to be sure
            broken = list(covered)
        failed.extend(copy.copy(covered[i]) for i in broken)
    if not failed:
        return len(first.results), []
    validator.result_format = RESULT_FORMAT
    named = validator.validate_expectation_suite(gx.ExpectationSuite(name=name, expectations=failed))
    return len(first.results), list(named.results)


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


def _describe(config: dict[str, Any], result: dict[str, Any], exception: str | None,
              frame: pd.DataFrame, spec: TableSpec) -> str:
    kind = config["type"]
    kwargs = config.get("kwargs", {})
    column = kwargs.get("column") or kwargs.get("column_list")
    count = int(result.get("unexpected_count") or 0)
    sample = result.get("partial_unexpected_list") or []
    if exception:
        return f"{kind}({column}) could not run: {exception}"
    if kind == "expect_table_row_count_to_be_between":
        return f"{kind}: the batch has {result.get('observed_value')} rows"
    if kind == "expect_column_values_to_be_in_type_list":
        observed = result.get("observed_value") or sorted({type(v).__name__ for v in sample})
        expected = spec.columns[column].type if column in spec.columns else kwargs.get("type_list", [])[:1]
        return f"column {column!r} ({expected}): expected {expected} values, got {observed}"
    if kind == "expect_column_values_to_not_be_null" and kwargs.get("mostly"):
        share = result.get("unexpected_percent", 0.0)
        return f"{kind}({column}): {share:.1f}% nulls, above the limit {100 * (1 - kwargs['mostly']):.1f}%"
    rows = "1 row" if count == 1 else f"{count} rows"
    if kind == "expect_column_values_to_not_be_null":
        detail, shown = " are null" if count != 1 else " is null", []
    elif "min_value" in kwargs or "max_value" in kwargs:
        detail = f" outside [{kwargs.get('min_value')}, {kwargs.get('max_value')}]"
        shown = _columns_of(kwargs)
    elif "value_set" in kwargs:
        detail, shown = " not in the allowed set", _columns_of(kwargs)
    elif kind in ("expect_column_values_to_be_unique", "expect_compound_columns_to_be_unique"):
        detail, shown = " repeat a key" if count != 1 else " repeats a key", _columns_of(kwargs)
    else:
        detail, shown = "", _columns_of(kwargs)
    label = ",".join(column) if isinstance(column, list) else column
    positions = result.get("unexpected_index_list")
    if positions and isinstance(positions[0], int | np.integer):  # not dicts of key columns
        present = [frame[c] for c in shown if c in frame.columns]
        return f"{kind}({label}): {rows}{detail}, {_where(positions, present if len(present) == len(shown) else [])}"
    return f"{kind}({label}): {rows}{detail} (e.g. {', '.join(_show(v) for v in sample[:3])})"


def _columns_of(kwargs: dict[str, Any]) -> list[str]:
    """The columns an expectation reads, for showing the offending rows' values."""
    if kwargs.get("column"):
        return [kwargs["column"]]
    if kwargs.get("column_list"):
        return list(kwargs["column_list"])
    return [kwargs[k] for k in ("column_A", "column_B") if kwargs.get(k)]


def validate(batch: pd.DataFrame, table: str, spec: TableSpec, docs_root: Path | None = None,
             suite_prefix: str = "", source: str = "") -> ValidationResult:
    """Check a batch against its table contract; split it into accepted and quarantined rows.

    Args:
        batch: the rows as read from the source.
        table: the table's name in the contract (named in every message).
        spec: the table's contract.
        docs_root: where Data Docs are written for a rejected batch; None writes none.
        suite_prefix: prepended to the suite's name (e.g. the dataset's name and a dot).
        source: where the batch came from, already masked of secrets; named by ``ValidationError``.
    """
    started = time.perf_counter()
    raw = batch.reset_index(drop=True)
    frame, failures, warnings = conform(raw, spec)
    reasons: dict[int, list[str]] = defaultdict(list)
    evaluated = first_pass = 0
    if len(frame) == 0:
        # Nothing else can be judged on no rows: type and column checks would only contradict.
        failures = [Failure("expect_table_row_count_to_be_between", None, "table",
                            f"{table}: the batch has no rows (only a header?)")]
        expectations = build_expectations(spec, [])[:1]  # the row-count expectation
        # Great Expectations is not run on no rows, but made ready: a caller warms the gate with
        # an empty batch (the stream writer, before its first micro-batch).
        _batch_definition(gx_context(None), _safe_name(f"{suite_prefix}{table}"))
        import core.gx_checks  # noqa: F401 - registers the combined expectation and its metric
    else:
        expectations = build_expectations(spec, [c for c in spec.columns if c in frame.columns])
        first_pass, failed = run_suite(frame, f"{suite_prefix}{table}", expectations)
        evaluated = len(expectations)
        mistyped = _collect(failed, frame, spec, failures, reasons)
        by_name = {str(c): c for c in raw.columns}
        for name, hit in non_finite_rows(raw, spec).items():
            if name in mistyped:
                continue
            positions = np.flatnonzero(hit)
            label = f"values_to_be_finite({name})"
            for index in positions.tolist():
                reasons[index].append(label)
            rows = "1 row is" if len(positions) == 1 else f"{len(positions)} rows are"
            hint = ("allow_non_finite: true accepts them" if spec.columns[name].type == "float"
                    else "an int column cannot hold them: conform read them as null")
            failures.append(Failure(
                "expect_column_values_to_be_finite", name, "row",
                f"expect_column_values_to_be_finite({name}): {rows} inf or -inf, "
                f"{_where(positions, [raw[by_name[name]]])} ({hint})",
                len(positions)))
        for name, hit in zoneless_rows(raw, spec).items():
            if name in mistyped:
                continue
            positions = np.flatnonzero(hit)
            for index in positions.tolist():
                reasons[index].append(f"values_to_have_time_zone({name})")
            rows = "1 row has" if len(positions) == 1 else f"{len(positions)} rows have"
            failures.append(Failure(
                "expect_column_values_to_have_time_zone", name, "row",
                f"expect_column_values_to_have_time_zone({name}): {rows} a time without a time zone, "
                f"{_where(positions, [raw[by_name[name]]])} (write it with its zone, e.g. "
                f"2013-01-01T05:00:00Z, or declare the zone to assume: timezone: UTC in the contract)",
                len(positions)))

    bad_index = np.fromiter(reasons.keys(), dtype=np.int64, count=len(reasons))
    bad_mask = np.zeros(len(frame), dtype=bool)
    bad_mask[bad_index] = True
    quarantined = frame[bad_mask].copy()
    quarantined[REASON_COLUMN] = pd.Series(["; ".join(reasons[i]) for i in quarantined.index],
                                           index=quarantined.index, dtype=object)
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
        evaluated=evaluated, first_pass=first_pass, data_docs=docs,
        seconds=time.perf_counter() - started, source=source)
    check_invariant(result)
    return result


def _collect(results: list[Any], frame: pd.DataFrame, spec: TableSpec, failures: list[Failure],
             reasons: dict[int, list[str]]) -> set[str]:
    """Turn a GX validation result into failures (each named once) and per-row reasons.

    A column of the wrong type is named once, by its type failure: its other checks (ranges,
    sets) would only fail or error on the same values. Returns those columns.
    """
    type_check = "expect_column_values_to_be_in_type_list"
    mistyped = {f.column for f in failures if f.expectation == type_check and f.column}
    mistyped |= {item.expectation_config.kwargs.get("column") for item in results
                 if item.expectation_config.type == type_check and not item.success}
    mistyped.discard(None)
    for item in results:
        expectation = item.expectation_config
        config = {"type": expectation.type, "kwargs": dict(expectation.kwargs)}
        level = (expectation.meta or {}).get(LEVEL, "row")
        exception = _exception_message(item.exception_info or {})
        if item.success and not exception:
            continue
        result = item.result or {}
        column = config["kwargs"].get("column")
        if column in mistyped and config["type"] != type_check:
            continue
        already = any(f.expectation == config["type"] and f.column == column for f in failures) or (
            config["type"] == "expect_table_columns_to_match_set"
            and any(f.expectation == "expect_column_to_exist" for f in failures))
        if (level == "table" or exception) and already:
            continue
        message = _describe(config, result, exception, frame, spec)
        if level == "table" or exception:
            failures.append(Failure(config["type"], column, "table", message,
                                    int(result.get("unexpected_count") or 0)))
            continue
        short = config["type"].removeprefix("expect_")
        label = f"{short}({column or ','.join(config['kwargs'].get('column_list', []))})"
        for index in result.get("unexpected_index_list") or []:
            reasons[int(index)].append(label)
        failures.append(Failure(config["type"], column, "row", message,
                                int(result.get("unexpected_count") or 0)))
    return mistyped


def _exception_message(info: dict[str, Any]) -> str | None:
    """GX reports errors either flat or keyed by metric id; return the first message."""
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None
