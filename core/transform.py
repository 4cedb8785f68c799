"""The feature transform as Arrow and NumPy kernels: one code path for 1 row and 10 million.

The contract's derived columns, its label and the encoding (categorical codes, standardized
numerics) are applied column by column with ``pyarrow.compute`` and NumPy: no per-row Python
and no pandas. ``Compiled`` holds what encoding needs of one (contract, feature stats) pair,
built once (vocabulary lookups, means and deviations as arrays, parsed expressions), so a
request pays only for the kernels. The Dask ETL runs it per partition (``core.features.derive``
and ``encode`` adapt pandas partitions to it), serving per batch (``serving.features``), the
monitor on replayed requests: the same functions, so the three cannot drift apart.

``core.features.derive_pandas`` and ``encode_pandas`` are the pandas transform this replaced;
``tests/test_transform.py`` compares the two on random data and ``benchmarks/transform.py``
times them side by side.

Value rules (those of the pandas transform, applied value by value):
- a categorical value's text is what Arrow's cast gives: ints as digits, a float with no
  fraction as an int (3.0 -> "3"), booleans as "True"/"False", text as is; a value outside the
  training vocabulary, or missing, is code 0;
- a numeric value that is missing or not finite is the training mean (0 after scaling);
- datetime parts are taken in the zone the derived column names (else UTC);
- ``concat`` is missing when any part is; ``expr`` is arithmetic over numeric columns with
  missing values as NaN.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from core.errors import FlywheelError

if TYPE_CHECKING:

    from core.contract import DatasetContract, DerivedSpec
    from core.features import FeatureStats

Columns = dict[str, Any]  # name -> pyarrow Array or ChunkedArray

# Below this many rows a vocabulary lookup is a dict per value (about 0.1 us each); above it
# Arrow's hash lookup (about 14 us to build per call, then 8 ns per value) wins.
SMALL_BATCH = 64


class TransformError(FlywheelError, ValueError):
    """The contract asks for something the transform cannot compute (an unsupported expression)."""


# ---------------------------------------------------------------------------- expressions

_BINARY: dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}


@lru_cache(maxsize=256)
def compile_expr(text: str) -> Callable[[Mapping[str, np.ndarray]], np.ndarray]:
    """An ``expr`` derived column as a function of float64 arrays (NaN for missing): numbers,
    column names, + - * / // % **, unary minus and comparisons (1.0 or 0.0; false where a
    side is NaN, as pandas.eval gives it). Anything else is refused with the expression named."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise TransformError(f"derived expression {text!r} is not valid: {exc.msg}") from None

    def build(node: ast.AST) -> Callable[[Mapping[str, np.ndarray]], Any]:
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            value = float(node.value)
            return lambda env: value
        if isinstance(node, ast.Name):
            name = node.id
            return lambda env: env[name]
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
            inner = build(node.operand)
            sign = -1.0 if isinstance(node.op, ast.USub) else 1.0
            return lambda env: sign * inner(env)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            fn, left, right = _BINARY[type(node.op)], build(node.left), build(node.right)
            return lambda env: fn(left(env), right(env))
        if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
            fn, left, right = _COMPARE[type(node.ops[0])], build(node.left), build(node.comparators[0])

            return lambda env: np.asarray(fn(left(env), right(env)), dtype=np.float64)
        raise TransformError(f"derived expression {text!r}: {ast.dump(node)[:60]} is not supported "
                             "(numbers, column names, + - * / // % **, unary minus and comparisons are)")

    body = build(tree)

    def run(env: Mapping[str, np.ndarray]) -> np.ndarray:
        with np.errstate(all="ignore"):  # 1/0 is inf and 0/0 NaN, as pandas gives them
            return np.asarray(body(env), dtype=np.float64)
    return run


@lru_cache(maxsize=256)
def expr_names(text: str) -> list[str]:
    return sorted({node.id for node in ast.walk(ast.parse(text, mode="eval")) if isinstance(node, ast.Name)})


# ---------------------------------------------------------------------------- column kernels


def floats(array: Any) -> np.ndarray:
    """A numeric (or boolean) column as float64 with NaN for missing values."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if len(array) <= SMALL_BATCH and not pa.types.is_timestamp(array.type):
        return np.array([np.nan if v is None else v for v in array.to_pylist()], dtype=np.float64)
    if pa.types.is_floating(array.type) and array.null_count == 0:
        return np.asarray(array.to_numpy(), dtype=np.float64)
    return np.asarray(pc.cast(array, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def utc_times(array: Any) -> Any:
    """A time column as UTC nanosecond timestamps (naive values are read as UTC)."""
    import pyarrow as pa

    if not pa.types.is_timestamp(array.type):
        raise TransformError(f"a time column must be a timestamp, not {array.type}")
    return array.cast(pa.timestamp("ns", tz="UTC"))


def category_text(array: Any) -> Any:
    """Categorical values as text, value by value (see the module's value rules)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    kind = array.type
    if pa.types.is_string(kind):
        return array
    if pa.types.is_boolean(kind):
        return pc.if_else(array, "True", "False")
    if pa.types.is_dictionary(kind):
        return category_text(pc.cast(array, kind.value_type))
    return pc.cast(array, pa.string())


def _datetime_part(array: Any, spec: DerivedSpec) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    times = utc_times(array)
    if spec.timezone:
        times = times.cast(pa.timestamp("ns", tz=spec.timezone))
    part = {"hour": pc.hour, "weekday": pc.day_of_week, "month": pc.month, "dayofyear": pc.day_of_year}[spec.op]
    return part(times)


def derive_columns(columns: Columns, contract: DatasetContract) -> Columns:
    """``columns`` plus the contract's derived columns and the label (NaN where the target is
    missing), in the contract's order (a derived column may read an earlier one)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = dict(columns)
    for spec in contract.derived:
        if spec.op == "concat":
            out[spec.name] = pc.binary_join_element_wise(*(category_text(out[c]) for c in spec.columns), spec.sep)
        elif spec.op == "expr":
            assert spec.expr is not None
            env = {name: floats(out[name]) for name in expr_names(spec.expr)}
            out[spec.name] = pa.array(compile_expr(spec.expr)(env), type=pa.float64())
        else:
            assert spec.column is not None
            out[spec.name] = _datetime_part(out[spec.column], spec)
    target = contract.target
    values = floats(out[target.column])
    if target.kind == "binary":
        with np.errstate(invalid="ignore"):
            values = np.where(np.isnan(values), np.nan, (values > target.threshold).astype(np.float64))
    out[target.name] = pa.array(values, type=pa.float64())
    return out


# ---------------------------------------------------------------------------- encoding


@dataclass(frozen=True)
class Encoded:
    """Model inputs of n rows: codes (n, categorical) int32, 0 = unknown or missing; numerics
    (n, numeric) float64, standardized, non-finite raw values at 0 (the mean)."""

    categorical: np.ndarray
    numeric: np.ndarray


class Compiled:
    """The encoding of one (contract, feature stats) pair, prepared once: get it with
    ``compiled(contract, stats)``."""

    def __init__(self, contract: DatasetContract, stats: FeatureStats):
        import pyarrow as pa
        import pyarrow.compute as pc

        self.contract, self.stats = contract, stats
        self.categorical = list(contract.features.categorical)
        self.numeric = list(contract.features.numeric)
        self.index = {name: {value: code for code, value in enumerate(stats.vocabularies[name], start=1)}
                      for name in self.categorical}
        self.lookup = {name: pc.SetLookupOptions(value_set=pa.array(stats.vocabularies[name], pa.string()))
                       for name in self.categorical}
        self.means = np.array([stats.means[n] for n in self.numeric], dtype=np.float64)
        self.stds = np.array([stats.stds[n] for n in self.numeric], dtype=np.float64)

    def codes(self, name: str, array: Any) -> np.ndarray:
        import pyarrow as pa
        import pyarrow.compute as pc

        if len(array) <= SMALL_BATCH:
            index = self.index[name]
            kind = array.type
            values: list[Any]
            if pa.types.is_integer(kind) or pa.types.is_boolean(kind):  # str() is Arrow's text for these
                values = [None if v is None else str(v) for v in array.to_pylist()]
            else:
                values = category_text(array).to_pylist()
            return np.fromiter((index.get(v, 0) for v in values), dtype=np.int32, count=len(values))
        text = category_text(array)
        found = pc.index_in(text, options=self.lookup[name])
        return np.asarray(pc.fill_null(pc.add(found, 1), 0).to_numpy(zero_copy_only=False), dtype=np.int32)

    def encode(self, columns: Columns, rows: int) -> Encoded:
        """Encode derived columns (``derive_columns``'s output) of ``rows`` rows."""
        # Column-major: each column is written (and, in the ETL, read back) in one piece.
        categorical = np.empty((rows, len(self.categorical)), dtype=np.int32, order="F")
        for j, name in enumerate(self.categorical):
            categorical[:, j] = self.codes(name, columns[name])
        numeric = np.empty((rows, len(self.numeric)), dtype=np.float64, order="F")
        for j, name in enumerate(self.numeric):
            numeric[:, j] = floats(columns[name])
        with np.errstate(all="ignore"):
            numeric -= self.means
            numeric /= self.stds
        numeric[~np.isfinite(numeric)] = 0.0
        return Encoded(categorical, numeric)


def compiled(contract: DatasetContract, stats: FeatureStats) -> Compiled:
    """The compiled encoding of this contract and these stats (built once, then cached: by
    the objects' identity, then by their fingerprints)."""
    def build() -> Compiled:
        prints = (contract.fingerprint(), stats.fingerprint())
        made = _by_fingerprint.get(prints) or Compiled(contract, stats)
        _by_fingerprint[prints] = made
        if len(_by_fingerprint) > 64:
            _by_fingerprint.pop(next(iter(_by_fingerprint)))
        return made
    return _once_per((contract, stats), build)


def _once_per(objects: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` once per these very objects (a request passes the same contract and stats
    objects each time; comparing them by value would cost more than the work)."""
    key = (build.__qualname__, *map(id, objects))
    entry = _by_identity.get(key)
    if entry is not None and all(a is b for a, b in zip(entry[0], objects, strict=True)):
        return entry[1]
    value = build()
    _by_identity[key] = (objects, value)  # holding the objects keeps their ids unique
    if len(_by_identity) > 128:
        _by_identity.pop(next(iter(_by_identity)))
    return value


_by_fingerprint: dict[tuple[str, str], Compiled] = {}
_by_identity: dict[tuple[Any, ...], tuple[tuple[Any, ...], Any]] = {}


# ---------------------------------------------------------------------------- records (serving)


def _arrow_types() -> dict[str, Any]:
    import pyarrow as pa

    return {"int": pa.int64(), "float": pa.float64(), "str": pa.string(), "bool": pa.bool_(),
            "datetime": pa.timestamp("ns", tz="UTC")}


def _as_datetime(value: Any) -> Any:
    """A record's time: a datetime as is, ISO text parsed (a replayed log row)."""
    from datetime import datetime

    if isinstance(value, str):
        return datetime.fromisoformat(value)
    return value


def record_columns(records: list[dict[str, Any]], contract: DatasetContract) -> Columns:
    """Request records (base-table fields, maybe joined ones) as columns of the contract's
    types; times in UTC (naive ones read as UTC); a field no record has is all missing."""
    import pyarrow as pa

    types = _arrow_types()
    out: Columns = {}
    for name, spec in _record_specs(contract).items():
        values = [record.get(name) for record in records]
        if spec.type == "datetime":
            values = [None if v is None else _as_datetime(v) for v in values]
        try:
            out[name] = pa.array(values, type=types[spec.type])
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
            raise TransformError(f"field {name!r} ({spec.type}): {exc}") from None
    return out


def _record_specs(contract: DatasetContract) -> dict[str, Any]:
    """The fields a record may carry (base columns the features need, joined columns) and
    their contract specs."""
    def build() -> dict[str, Any]:
        base = contract.tables[contract.base_table]
        specs = {name: base.columns[name] for name in contract.base_columns_needed()}
        for join in contract.joins:
            for column in contract.join_columns(join):
                specs.setdefault(f"{column}{join.suffix}", contract.tables[join.table].columns[column])
        return specs
    return _once_per((contract,), build)


def _key_list(array: Any) -> list[Any]:
    """Join-key values as Python scalars that compare equal across types (times as UTC
    nanoseconds), as ``core.features.index_lookups`` keys the lookup tables."""
    import pyarrow as pa

    if pa.types.is_timestamp(array.type):
        return utc_times(array).cast(pa.int64()).to_pylist()
    return array.to_pylist()


def join_records(columns: Columns, lookups: Mapping[str, Any], contract: DatasetContract,
                 ) -> tuple[Columns, dict[str, np.ndarray]]:
    """Left-join the indexed lookup tables (``core.features.IndexedLookup``) onto record
    columns. A non-missing joined value a record sent wins over the lookup's; a table whose
    every column the record sent is not missing for it. Returns the joined columns and, per
    table, which rows found no match."""
    import pyarrow as pa
    import pyarrow.compute as pc

    out = dict(columns)
    rows = len(next(iter(columns.values()))) if columns else 0
    missing: dict[str, np.ndarray] = {}
    for join in contract.joins:
        lookup = lookups[join.table]
        no_match = lookup.rows
        keys = zip(*(_key_list(columns[k]) for k in lookup.keys), strict=True)
        positions = np.fromiter((lookup.positions.get(key, no_match) for key in keys), dtype=np.int64, count=rows)
        found = lookup.arrow.take(pa.array(positions))
        names = [f"{column}{join.suffix}" for column in contract.join_columns(join)]
        for name in names:
            looked_up = found.column(name)
            sent = columns.get(name)
            out[name] = (looked_up if sent is None or sent.null_count == len(sent)
                         else pc.coalesce(sent.cast(looked_up.type), looked_up))
        unmatched = positions == no_match
        sent_columns = [columns.get(name) for name in names]
        if unmatched.any() and all(s is not None and s.null_count < len(s) for s in sent_columns):
            complete = np.logical_and.reduce([np.asarray(s.is_valid().to_numpy(zero_copy_only=False), dtype=np.bool_)
                                              for s in sent_columns if s is not None])
            unmatched &= ~complete
        missing[join.table] = unmatched
    return out, missing


# A value the schema allows but the model never saw the like of (1e308 in float32 is inf) is
# held to 10,000 standard deviations, so it still gets a finite score: no training row comes
# near that, so nothing a model learnt changes (the skew test holds).
Z_LIMIT = 1e4


def encode_records(records: list[dict[str, Any]], lookups: Mapping[str, Any], contract: DatasetContract,
                   stats: FeatureStats) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Records to what a model takes, as the service scores them and the monitor replays them:
    categorical codes (int64), standardized numerics (float32, held to +-Z_LIMIT) and, per
    joined table, which records found no row for their keys."""
    import pyarrow as pa

    columns, missing = join_records(record_columns(records, contract), lookups, contract)
    columns[contract.target.column] = pa.nulls(len(records), pa.float64())  # what is predicted
    encoded = compiled(contract, stats).encode(derive_columns(columns, contract), len(records))
    numeric = np.clip(encoded.numeric, -Z_LIMIT, Z_LIMIT).astype(np.float32, order="C")
    return np.ascontiguousarray(encoded.categorical, dtype=np.int64), numeric, missing
