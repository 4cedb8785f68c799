"""One Great Expectations expectation that decides many of the contract's checks at once.

Great Expectations spends a few milliseconds of its own on every expectation of a suite,
whatever the batch's size (it builds each one's metric dependency graph, and rebuilds the
expectation's configuration dozens of times doing so): on the flights contract's 59
expectations that was most of a 100-row micro-batch's cost. ``ExpectTableToPassChecks`` is a
custom expectation, registered with Great Expectations like its own, whose single metric
(``table.flywheel_broken_checks``) evaluates a list of the contract's standard checks (type
lists, not null with or without ``mostly``, between, in set, not matching a regex) in one
pass over the batch, with the same pandas operations as Great Expectations' own metrics, and
answers which of them are broken.

The gate runs it first; only the standard expectations it names as broken run after it, with
the result format that names the offending rows. Those standard expectations, not this one,
say which rows go to quarantine and why, and render the Data Docs. A check is combined here
only where the column's dtype takes the same path through Great Expectations' own code (see
``combinable``); any other stays a standard expectation of the first pass. A check that cannot
be evaluated here (an error) is reported broken, so its standard expectation runs and reports.

No Great Expectations behaviour is patched. One private method is called: the type verdict of
``ExpectColumnValuesToBeInTypeList`` (``_validate_pandas``), so that the combined check's verdict
on a dtype is exactly Great Expectations' own. Should an upgrade move it, the metric fails, the
gate falls back to running every check as its standard expectation (right, but slow), and
``tests/test_validation.py`` fails to say so.

This module imports Great Expectations: ``core.validation`` imports it only when a batch is
validated.
"""

import functools
import json
import re
from typing import Any, ClassVar

import numpy as np
import pandas as pd
from great_expectations.core.metric_domain_types import MetricDomainTypes
from great_expectations.execution_engine import ExecutionEngine, PandasExecutionEngine
from great_expectations.expectations import core as gx_core
from great_expectations.expectations.expectation import BatchExpectation
from great_expectations.expectations.metrics.metric_provider import metric_value
from great_expectations.expectations.metrics.table_metric_provider import TableMetricProvider

METRIC = "table.flywheel_broken_checks"
EXPECTATION_TYPE = "expect_table_to_pass_checks"

# The standard expectations a check can stand for, by the kind of check.
KINDS: dict[type, str] = {
    gx_core.ExpectColumnValuesToBeInTypeList: "type",
    gx_core.ExpectColumnValuesToNotBeNull: "not_null",
    gx_core.ExpectColumnValuesToBeBetween: "between",
    gx_core.ExpectColumnValuesToBeInSet: "in_set",
    gx_core.ExpectColumnValuesToNotMatchRegex: "not_match_regex",
}


def combinable(expectation: Any, frame: pd.DataFrame) -> dict[str, Any] | None:
    """The check (a JSON-able dict, without its id) that stands for a standard expectation on
    this frame, or None where the expectation must run on its own: a kind not handled here, a
    row condition, a ``mostly`` on anything but not-null, suite parameters instead of values,
    or a dtype that Great Expectations treats differently (element types of an object column,
    bounds on anything but numbers)."""
    kind = KINDS.get(type(expectation))
    if kind is None or getattr(expectation, "row_condition", None):
        return None
    column = expectation.column
    mostly = expectation.mostly
    if column not in frame.columns or not isinstance(mostly, int | float) or (kind != "not_null" and mostly != 1):
        return None
    dtype = frame[column].dtype
    if kind == "type":
        # Great Expectations checks an object column's values one by one (a map metric); any
        # other dtype by the dtype alone, which is what is reproduced here.
        type_list = expectation.type_list
        if dtype.type.__name__ == "object_" or not isinstance(type_list, list):
            return None
        return {"kind": kind, "column": column, "type_list": [str(t) for t in type_list]}
    if kind == "not_null":
        return {"kind": kind, "column": column, "mostly": float(mostly)}
    if kind == "between":
        bounds = [expectation.min_value, expectation.max_value]
        numeric = pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype)
        if (not numeric or expectation.strict_min or expectation.strict_max
                or all(b is None for b in bounds)
                or any(isinstance(b, bool) or not isinstance(b, int | float | None) for b in bounds)):
            return None
        return {"kind": kind, "column": column, "min_value": bounds[0], "max_value": bounds[1]}
    if kind == "in_set":
        value_set = expectation.value_set
        # Values JSON carries unchanged (a date, say, would come back as text): others run alone.
        if not isinstance(value_set, list | set | tuple) or any(
                v is not None and type(v) not in (str, int, float, bool) for v in value_set):
            return None
        return {"kind": kind, "column": column, "value_set": list(value_set)}
    regex = expectation.regex
    if not isinstance(regex, str):
        return None
    return {"kind": kind, "column": column, "regex": regex}


_TYPE_VERDICTS: dict[tuple[str, str, tuple[str, ...]], bool] = {}


def _type_passes(dtype: Any, type_list: list[str]) -> bool:
    """Great Expectations' own verdict on a dtype against a type list (what
    ``ExpectColumnValuesToBeInTypeList`` decides for a column that is not of object dtype)."""
    key = (type(dtype).__name__, str(dtype), tuple(type_list))
    if key not in _TYPE_VERDICTS:
        standard = gx_core.ExpectColumnValuesToBeInTypeList(column="_", type_list=list(type_list))
        verdict = standard._validate_pandas(actual_column_type=dtype, expected_types_list=list(type_list))
        _TYPE_VERDICTS[key] = bool(verdict["success"])
    return _TYPE_VERDICTS[key]


def _passes(frame: pd.DataFrame, check: dict[str, Any], nulls: dict[str, np.ndarray]) -> bool:
    """Whether one check holds on the frame; the operations are those of Great Expectations'
    pandas metrics for the standard expectation (nulls are left out of every map check but
    not-null, as Great Expectations' map metrics leave them out)."""
    column = frame[check["column"]]
    kind = check["kind"]
    if kind == "type":
        return column.dtype.type.__name__ != "object_" and _type_passes(column.dtype, check["type_list"])
    if check["column"] not in nulls:
        nulls[check["column"]] = column.isnull().to_numpy(dtype=bool)
    null = nulls[check["column"]]
    if kind == "not_null":
        total = len(column)
        unexpected = int(null.sum())
        return total == 0 or (total - unexpected) / total >= check["mostly"]
    values = column[~null] if null.any() else column
    if kind == "between":
        low, high = check["min_value"], check["max_value"]
        if low is not None and high is not None:
            if low > high:
                return False  # Great Expectations raises: its expectation will say so
            inside = (low <= values) & (values <= high)
        elif high is not None:
            inside = values <= high
        else:
            inside = low <= values
        return bool(np.asarray(inside, dtype=bool).all())
    if kind == "in_set":
        return bool(values.isin(check["value_set"]).all())
    if kind == "not_match_regex":
        # Text: each distinct value once (the same answer, far fewer regex searches). Not for
        # object columns, where values that compare equal can read differently (1 and True).
        distinct = pd.Series(values.unique(), dtype=values.dtype) if isinstance(values.dtype, pd.StringDtype) else values
        return not bool(distinct.astype(str).str.contains(check["regex"]).any())
    return False


@functools.lru_cache(maxsize=64)
def parse_checks(text: str) -> tuple[dict[str, Any], ...]:
    """The checks of an ``ExpectTableToPassChecks`` (a JSON list: see ``dump_checks``)."""
    return tuple(json.loads(text))


def dump_checks(checks: list[dict[str, Any]]) -> str:
    """The checks as ``ExpectTableToPassChecks`` takes them: one JSON text. Great Expectations
    rebuilds an expectation's configuration (a pydantic ``dict()`` of every field) dozens of
    times per validation; a nested list of dicts made that the first pass's largest cost, one
    string costs next to nothing."""
    return json.dumps(checks, sort_keys=True, separators=(",", ":"))


def broken_checks(frame: pd.DataFrame, checks: str) -> list[int]:
    """The ids of the checks that do not hold (or could not be evaluated) on the frame."""
    broken: list[int] = []
    nulls: dict[str, np.ndarray] = {}
    for check in parse_checks(checks):
        try:
            ok = check["column"] in frame.columns and _passes(frame, check, nulls)
        except (TypeError, ValueError, re.error):
            ok = False  # the standard expectation runs next and reports the error in its words
        if not ok:
            broken.append(int(check["id"]))
    return broken


class TableBrokenChecks(TableMetricProvider):
    """The ids of the checks (``ExpectTableToPassChecks``'s ``checks``) broken by the batch."""

    metric_name = METRIC
    value_keys = ("checks",)

    @metric_value(engine=PandasExecutionEngine)
    def _pandas(cls, execution_engine: PandasExecutionEngine, metric_domain_kwargs: dict,
                metric_value_kwargs: dict, metrics: dict[str, Any], runtime_configuration: dict) -> list[int]:
        frame, _, _ = execution_engine.get_compute_domain(metric_domain_kwargs, domain_type=MetricDomainTypes.TABLE)
        return broken_checks(frame, metric_value_kwargs["checks"])


class ExpectTableToPassChecks(BatchExpectation):
    """Expect every check of ``checks`` to hold: each is one standard expectation of the
    contract's suite (``{"id", "kind", "column", ...}``, see ``combinable``), all given as one
    JSON text (``dump_checks``). The observed value is the list of the ids of those that do not."""

    checks: str

    metric_dependencies: ClassVar[tuple[str, ...]] = (METRIC,)
    success_keys: ClassVar[tuple[str, ...]] = ("checks",)
    args_keys: ClassVar[tuple[str, ...]] = ("checks",)

    def _validate(self, metrics: dict, runtime_configuration: dict | None = None,
                  execution_engine: ExecutionEngine | None = None) -> dict[str, Any]:
        broken = list(metrics[METRIC])
        return {"success": not broken, "result": {"observed_value": broken}}
