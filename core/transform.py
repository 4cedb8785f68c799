"""The feature transform as Arrow and NumPy kernels: one code path for 1 row and 10 million.

The contract's derived columns, its label and the encoding (categorical codes, standardized
numerics) are applied column by column with ``pyarrow.compute`` and NumPy: no per-row Python
and no pandas. ``Compiled`` holds what encoding needs of one (contract, feature stats) pair,
built once (vocabulary lookups, means and deviations as arrays, parsed expressions), so a
request pays only for the kernels. The Dask ETL runs it per partition (on Arrow tables:
``prepare_partition``, ``partition_aggregates``, ``encode_partition`` below; ``core.features.derive``
and ``encode`` adapt pandas frames to the same kernels), serving per batch (``serving.features``), the
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


# ---------------------------------------------------------------------------- ETL partitions (Arrow tables)
#
# The Dask ETL keeps each partition as Arrow and NumPy from the Parquet read to the encoded
# table it writes: no pandas frame, no Python object per value. A partition is joined
# by key and derived once (``prepare_partition``), kept in the cluster's memory as compact
# columns (dictionary-encoded categoricals, float64 numerics), counted for the training
# statistics (``partition_aggregates``) and then encoded (``encode_partition``).


@dataclass(frozen=True)
class ArrowLookup:
    """A prepared lookup table (``core.features.prepare_lookups``) for joining Arrow tables by
    key: its rows' combined key codes (unique) and its kept columns."""

    keys: tuple[str, ...]
    key_values: tuple[Any, ...]  # per key column: the lookup's distinct values (normalized)
    radix: tuple[int, ...]
    combined: Any  # int64 key code of each lookup row (only with several keys)
    columns: Any  # pyarrow Table: the kept (suffixed) columns, one row per key


def _key_array(array: Any) -> Any:
    """A join-key column in a form that compares equal across sources: times as UTC
    nanoseconds, text as string, dictionaries decoded."""
    import pyarrow as pa

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if pa.types.is_dictionary(array.type):
        array = array.dictionary_decode()
    return _plain_key(array)


def _plain_key(array: Any) -> Any:
    import pyarrow as pa

    if pa.types.is_timestamp(array.type):
        return utc_times(array).cast(pa.int64())
    if pa.types.is_large_string(array.type):
        return array.cast(pa.string())
    return array


def _same_key_type(left: Any, right: Any) -> tuple[Any, Any]:
    import pyarrow as pa

    if left.type == right.type:
        return left, right
    numeric = (pa.types.is_integer, pa.types.is_floating)
    if any(f(left.type) for f in numeric) and any(f(right.type) for f in numeric):
        return left.cast(pa.float64()), right.cast(pa.float64())
    return left.cast(right.type), right


def arrow_lookups(prepared: Mapping[str, Any], contract: DatasetContract) -> dict[str, ArrowLookup]:
    """``prepare_lookups``'s frames (one row per key) as ``ArrowLookup``s."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from core.features import arrow_column

    out = {}
    for join in contract.joins:
        frame = prepared[join.table].reset_index(drop=True)
        keys = tuple(join.left_keys)
        key_arrays = [_key_array(arrow_column(frame[k])) for k in keys]
        columns = pa.table({name: arrow_column(frame[name]) for name in frame.columns if name not in keys})
        if len(keys) == 1:
            out[join.table] = ArrowLookup(keys, (key_arrays[0],), (len(frame),), None, columns)
            continue
        values = tuple(pc.unique(a) for a in key_arrays)
        radix = tuple(len(v) for v in values)
        if float(np.prod([float(r) for r in radix])) >= 2.0 ** 62:
            raise TransformError(f"join with {join.table}: too many distinct key combinations")
        combined = _combined_codes(key_arrays, values, radix)
        out[join.table] = ArrowLookup(keys, values, radix, combined, columns)
    return out


def _combined_codes(arrays: list[Any], values: tuple[Any, ...], radix: tuple[int, ...]) -> Any:
    """One int64 code per row for several key columns (null where a value is not in ``values``)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    combined = None
    for array, value_set, size in zip(arrays, values, radix, strict=True):
        codes = _positions(array, value_set).cast(pa.int64())
        combined = codes if combined is None else pc.add(pc.multiply(combined, size), codes)
    return combined


def _positions(array: Any, value_set: Any) -> Any:
    """Each value's position in ``value_set`` (null where absent). A dictionary column (text
    read as Parquet stores it) is looked up once per distinct value, then gathered."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        if array.num_chunks == 0:  # an empty slice
            array = pa.array([], type=array.type)
        elif array.num_chunks != 1:
            array = array.combine_chunks() if not pa.types.is_dictionary(array.type) else \
                pa.chunked_array([c.dictionary_decode() for c in array.chunks],
                                 type=array.type.value_type).combine_chunks()
        else:
            array = array.chunk(0)
    if pa.types.is_dictionary(array.type):
        left, right = _same_key_type(_plain_key(array.dictionary), value_set)
        return pc.index_in(left, value_set=right).take(array.indices)
    left, right = _same_key_type(_plain_key(array), value_set)
    return pc.index_in(left, value_set=right)


def join_table(table: Any, lookups: Mapping[str, ArrowLookup], contract: DatasetContract) -> Columns:
    """Left-join the lookups onto an Arrow table of base rows, by key (a hash lookup per key
    column, then a ``take``): the base columns plus each lookup's kept columns, missing where
    a row's key is not in the lookup (as a left merge gives them)."""
    import pyarrow.compute as pc

    columns: Columns = {name: table.column(name) for name in table.column_names}
    for join in contract.joins:
        lookup = lookups[join.table]
        arrays = [table.column(k) for k in lookup.keys]
        if lookup.combined is None:
            rows = _positions(arrays[0], lookup.key_values[0])
        else:
            rows = pc.index_in(_combined_codes(arrays, lookup.key_values, lookup.radix), value_set=lookup.combined)
        found = lookup.columns.take(rows)
        for name in found.column_names:
            columns[name] = found.column(name)
    return columns


@dataclass
class Partition:
    """The labelled rows of one partition, joined and derived, as the encoding reads them:
    times (UTC nanoseconds, ``valid`` where present), label, each categorical as dictionary
    indices (-1 = missing) with its dictionary's text, numerics as float64 (NaN = missing or
    not finite). ``rows``, ``unlabeled``, ``first`` and ``last`` describe every row read."""

    times: np.ndarray
    time_valid: np.ndarray
    label: np.ndarray
    indices: list[np.ndarray]
    dictionaries: list[Any]
    numeric: np.ndarray
    unlabeled: int
    first: Any
    last: Any

    @property
    def labelled_nanos(self) -> np.ndarray:
        return self.times[self.time_valid]


def _dictionary_codes(array: Any) -> tuple[np.ndarray, Any]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    encoded = array if pa.types.is_dictionary(array.type) else pc.dictionary_encode(array)
    indices = np.asarray(pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False), dtype=np.int32)
    return indices, category_text(encoded.dictionary)


def prepare_partition(table: Any, lookups: Mapping[str, ArrowLookup], contract: DatasetContract) -> Partition:
    """Base rows (an Arrow table) joined, derived and reduced to what the statistics and the
    encoding read, labelled rows only."""
    import pyarrow as pa
    import pyarrow.compute as pc

    read = table.num_rows
    # Rows without a label are dropped first (before the join, when the target and the time
    # are base columns): the label and the time range are all that is kept of them.
    early = {contract.target.column, contract.time_column} <= set(table.column_names)
    columns = table if early else join_table(table, lookups, contract)
    time_range = pc.min_max(utc_times(columns[contract.time_column]))
    labelled = ~np.isnan(floats(columns[contract.target.column]))
    if not labelled.all():
        mask = pa.array(labelled)
        columns = (table.filter(mask) if early
                   else {name: column.filter(mask) for name, column in columns.items()})
    columns = derive_columns(join_table(columns, lookups, contract) if early else columns, contract)
    label = floats(columns[contract.target.name])
    times = utc_times(columns[contract.time_column])
    if isinstance(times, pa.ChunkedArray):
        times = times.combine_chunks()
    valid = np.asarray(times.is_valid().to_numpy(zero_copy_only=False), dtype=np.bool_)
    nanos = np.asarray(pc.fill_null(times.cast(pa.int64()), 0).to_numpy(zero_copy_only=False), dtype=np.int64)
    indices, dictionaries = [], []
    for name in contract.features.categorical:
        codes, text = _dictionary_codes(columns[name])
        indices.append(codes)
        dictionaries.append(text)
    numeric = np.empty((len(label), len(contract.features.numeric)), dtype=np.float64, order="F")
    for j, name in enumerate(contract.features.numeric):
        numeric[:, j] = floats(columns[name])
    numeric[~np.isfinite(numeric)] = np.nan
    return Partition(nanos, valid, label, indices, dictionaries, numeric, int(read - len(label)),
                     time_range["min"].as_py(), time_range["max"].as_py())


def _nanos(text: str) -> int:
    from core.features import utc_timestamp

    return int(utc_timestamp(text).as_unit("ns").value)


def partition_aggregates(part: Partition, train_end: str, validation_end: str) -> dict[str, Any]:
    """What the training statistics need of one partition: value counts of each categorical's
    text, count / mean / sum of squared deviations of each numeric (finite values), label
    count and sum on training rows; labelled rows per split; every row's time range."""
    bounds = np.array([_nanos(train_end), _nanos(validation_end)], dtype=np.int64)
    split = _split_index(part, bounds)
    train = split == 0
    counts = []
    for indices, text in zip(part.indices, part.dictionaries, strict=True):
        chosen = indices[train]
        tally = np.bincount(chosen[chosen >= 0], minlength=len(text))
        by_text: dict[str, int] = {}
        for value, n in zip(text.to_pylist(), tally.tolist(), strict=True):
            if n and value is not None:
                by_text[value] = by_text.get(value, 0) + n
        counts.append(by_text)
    width = part.numeric.shape[1]
    n, mean, m2 = np.zeros(width, dtype=np.int64), np.zeros(width), np.zeros(width)
    for j in range(width):
        values = part.numeric[:, j][train]
        values = values[~np.isnan(values)]
        if len(values):
            n[j], mean[j] = len(values), values.mean()
            deviations = values - mean[j]
            m2[j] = float(np.dot(deviations, deviations))
    return {"counts": counts, "n": n, "mean": mean, "m2": m2,
            "label_count": int(train.sum()), "label_sum": float(part.label[train].sum()),
            "splits": np.bincount(split, minlength=3), "unlabeled": part.unlabeled,
            "first": part.first, "last": part.last}


def combine_aggregates(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """Partitions' aggregates as one (Chan et al.'s pairwise update for means and variances)."""
    total = parts[0]
    out = {"counts": [dict(c) for c in total["counts"]], "n": total["n"].astype(np.float64),
           "mean": total["mean"].copy(), "m2": total["m2"].copy(), "label_count": total["label_count"],
           "label_sum": total["label_sum"], "splits": total["splits"].copy(), "unlabeled": total["unlabeled"],
           "first": total["first"], "last": total["last"]}
    for part in parts[1:]:
        for mine, theirs in zip(out["counts"], part["counts"], strict=True):
            for value, count in theirs.items():
                mine[value] = mine.get(value, 0) + count
        n_b = part["n"].astype(np.float64)
        n = out["n"] + n_b
        with np.errstate(all="ignore"):
            delta = part["mean"] - out["mean"]
            share = np.where(n > 0, n_b / n, 0.0)
            out["m2"] = out["m2"] + part["m2"] + delta ** 2 * out["n"] * share
            out["mean"] = out["mean"] + delta * share
        out["n"] = n
        out["label_count"] += part["label_count"]
        out["label_sum"] += part["label_sum"]
        out["splits"] = out["splits"] + part["splits"]
        out["unlabeled"] += part["unlabeled"]
        for key, pick in (("first", min), ("last", max)):
            seen = [v for v in (out[key], part[key]) if v is not None]
            out[key] = pick(seen) if seen else None
    return out


def _split_index(part: Partition, bounds: np.ndarray) -> np.ndarray:
    index = np.searchsorted(bounds, part.times, side="right").astype(np.int8)
    index[~part.time_valid] = 2  # no time: not before either boundary
    return index


def encode_partition(part: Partition, contract: DatasetContract, stats: FeatureStats) -> Any:
    """A prepared partition's model inputs as an Arrow table: time (UTC), split, label,
    categorical codes (int32) and standardized numerics (float32), as ``core.features.encode``
    gives them."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from core.features import SPLIT_COLUMN, SPLITS

    made = compiled(contract, stats)
    bounds = np.array([_nanos(stats.train_end), _nanos(stats.validation_end)], dtype=np.int64)
    split = pa.DictionaryArray.from_arrays(pa.array(_split_index(part, bounds)), pa.array(SPLITS)).cast(pa.string())
    times = pa.array(part.times, type=pa.int64(), mask=~part.time_valid).cast(pa.timestamp("ns", tz="UTC"))
    out: dict[str, Any] = {contract.time_column: times, SPLIT_COLUMN: split,
                           contract.target.name: pa.array(part.label, type=pa.float64())}
    for name, indices, text in zip(made.categorical, part.indices, part.dictionaries, strict=True):
        found = pc.index_in(text, options=made.lookup[name])
        codes = np.asarray(pc.fill_null(pc.add(found, 1), 0).to_numpy(zero_copy_only=False), dtype=np.int32)
        out[name] = pa.array(np.append(codes, np.int32(0))[indices])  # -1 (missing) takes the 0 at the end
    with np.errstate(all="ignore"):
        scaled = (part.numeric - made.means) / made.stds
    scaled[~np.isfinite(scaled)] = 0.0
    for j, name in enumerate(made.numeric):
        out[name] = pa.array(scaled[:, j].astype(np.float32))
    return pa.table(out)
