"""The compiled transform (core.transform) against the pandas transform it replaced
(core.features.transform_pandas), on random data of a contract with every kind of column and
derived feature: nulls, categories the vocabulary never saw, times in other zones, infinities.

Both the ETL's path (pandas partitions through ``core.features.transform``) and serving's
(records through ``serving.features.inputs``, lookups indexed as the service holds them) must
give the pandas transform's codes and numerics exactly."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.contract import DatasetContract
from core.features import (
    derive_pandas,
    fit_stats,
    frame_from_records,
    index_lookups,
    join_lookups,
    prepare_lookups,
    transform,
    transform_pandas,
)
from core.transform import TransformError, compile_expr
from serving.features import Z_LIMIT, LookupSnapshot, inputs

ZONES = [None, "UTC", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
CITIES = ["a", "b", "c", "d", "zz"]  # "zz" is in no lookup row


def contract_for(zone: str | None, part: str) -> DatasetContract:
    return DatasetContract.model_validate({
        "name": "random", "base_table": "trips",
        "tables": {
            "trips": {"source": {"kind": "file", "path": "t.csv"}, "columns": {
                "city": {"type": "str"}, "n": {"type": "int"}, "f": {"type": "float"},
                "flag": {"type": "bool"}, "code": {"type": "float"}, "at": {"type": "datetime"},
                "y": {"type": "float"}}},
            "cities": {"source": {"kind": "file", "path": "c.csv"}, "columns": {
                "city": {"type": "str"}, "pop": {"type": "float"}, "region": {"type": "str"},
                "rank": {"type": "int"}}},
        },
        "joins": [{"table": "cities", "join_on": ["city"], "suffix": "_c"}],
        "derived": [
            {"name": "part", "op": part, "column": "at", "timezone": zone},
            {"name": "pair", "op": "concat", "columns": ["city", "n"], "sep": "/"},
            {"name": "ratio", "op": "expr", "expr": "f * 2 - n / pop_c"},
            {"name": "over", "op": "expr", "expr": "f > 1"},
        ],
        "target": {"column": "y", "kind": "binary", "threshold": 0.5, "name": "label"},
        "features": {"categorical": ["city", "n", "flag", "code", "part", "pair", "region_c", "rank_c"],
                     "numeric": ["f", "ratio", "over", "pop_c"], "max_categories": 3},
        "time_column": "at",
        "split": {"train_end": "2024-03-01", "validation_end": "2024-06-01"},
    })


def lookup_table() -> pd.DataFrame:
    return pd.DataFrame({"city": ["a", "b", "c", "d"], "pop": [1.0, 0.0, np.inf, None],
                         "region": ["north", None, "south", "north"], "rank": pd.array([1, 2, None, 4], "Int64")})


floats = st.one_of(st.none(), st.just(np.inf), st.just(-np.inf), st.floats(-1e6, 1e6, allow_nan=False))
times = st.one_of(st.none(), st.datetimes(datetime(2023, 6, 1), datetime(2024, 12, 31)).map(
    lambda t: t.replace(tzinfo=UTC)))


@st.composite
def trips(draw: st.DrawFn) -> pd.DataFrame:
    n = draw(st.integers(1, 40))
    column = lambda strategy: draw(st.lists(strategy, min_size=n, max_size=n))  # noqa: E731
    return pd.DataFrame({
        "city": pd.array(column(st.one_of(st.none(), st.sampled_from(CITIES))), "string"),
        "n": pd.array(column(st.one_of(st.none(), st.integers(-3, 5))), "Int64"),
        "f": column(floats),
        "flag": pd.array(column(st.one_of(st.none(), st.booleans())), "boolean"),
        # A float category: whole numbers (as a float column of ints with gaps arrives)
        "code": column(st.one_of(st.none(), st.sampled_from([1.0, 2.0, 7.0, 1e3]))),
        "at": pd.to_datetime(pd.Series(column(times), dtype=object), utc=True),
        "y": column(st.one_of(st.none(), st.floats(0, 1))),
    }).astype({"f": "float64", "code": "float64", "y": "float64"})


def fitted(contract: DatasetContract, frame: pd.DataFrame):
    lookups = prepare_lookups({"cities": lookup_table()}, contract)
    joined = join_lookups(frame, lookups, contract)
    return lookups, joined, fit_stats(derive_pandas(joined, contract), contract, "2024-03-01", "2024-06-01")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=trips(), zone=st.sampled_from(ZONES), part=st.sampled_from(["hour", "weekday", "month", "dayofyear"]))
def test_the_compiled_transform_equals_the_pandas_transform_on_partitions(frame, zone, part):
    contract = contract_for(zone, part)
    _, joined, stats = fitted(contract, frame)
    expected = transform_pandas(joined, contract, stats)
    got = transform(joined, contract, stats)
    assert list(got.columns) == list(expected.columns)
    for name in contract.features.categorical:
        assert got[name].tolist() == expected[name].tolist(), name
    for name in contract.features.numeric:
        np.testing.assert_array_equal(got[name].to_numpy(), expected[name].to_numpy(), err_msg=name)
    assert got["split"].tolist() == expected["split"].astype(object).tolist()
    np.testing.assert_array_equal(got["label"].to_numpy(), expected["label"].to_numpy())
    assert (got["at"] == expected["at"]).sum() == expected["at"].notna().sum()


def as_records(frame: pd.DataFrame) -> list[dict]:
    records = []
    for row in frame.drop(columns=["y"]).astype(object).to_dict("records"):
        record = {k: (None if v is None or v is pd.NA or v is pd.NaT or (isinstance(v, float) and v != v) else v)
                  for k, v in row.items()}
        if record["at"] is not None:  # as a request sends it: some other zone
            record["at"] = record["at"].to_pydatetime().astimezone(timezone(timedelta(hours=-7)))
        records.append(record)
    return records


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=trips(), zone=st.sampled_from(ZONES), part=st.sampled_from(["hour", "weekday", "month", "dayofyear"]),
       sent_pop=st.lists(st.one_of(st.none(), st.floats(0.5, 9)), min_size=40, max_size=40))
def test_serving_inputs_equal_the_pandas_transform_of_the_same_records(frame, zone, part, sent_pop):
    contract = contract_for(zone, part)
    lookups, _, stats = fitted(contract, frame)
    records = as_records(frame)
    for record, pop in zip(records, sent_pop, strict=False):  # a value the request sends wins
        record["pop_c"] = pop
    categorical, numeric, missing = inputs(records, LookupSnapshot(index_lookups(lookups, contract), {}),
                                           contract, stats)
    # The pandas reference: merge, then the request's own values over the lookup's.
    sent = frame_from_records(records, contract)
    joined = join_lookups(sent.drop(columns=["pop_c"]), lookups, contract)
    joined["pop_c"] = sent["pop_c"].where(sent["pop_c"].notna(), joined["pop_c"])
    joined["y"] = np.nan
    expected = transform_pandas(joined, contract, stats)
    assert categorical.dtype == np.int64 and numeric.dtype == np.float32
    np.testing.assert_array_equal(categorical, expected[contract.features.categorical].to_numpy(np.int64))
    want = np.clip(expected[contract.features.numeric].to_numpy(np.float64), -Z_LIMIT, Z_LIMIT).astype(np.float32)
    np.testing.assert_array_equal(numeric, want)
    unknown = [r["city"] not in ("a", "b", "c", "d") for r in records]
    assert [m == ["cities"] for m in missing] == unknown


def test_one_record_and_a_batch_get_the_same_inputs():
    """A row scores the same alone or in a batch (above and below the small-batch size)."""
    contract = contract_for("America/New_York", "hour")
    frame = pd.DataFrame({  # a fixed, mixed batch
        "city": pd.array((CITIES * 30)[:130], "string"), "n": pd.array([1, None, 3, 4, 5] * 26, "Int64"),
        "f": [0.5, np.inf, None, 2.0, -1.0] * 26, "flag": pd.array([True, False, None, True, False] * 26, "boolean"),
        "code": [1.0, 2.0, None, 7.0, 1e3] * 26,
        "at": pd.date_range("2024-01-01", periods=130, freq="7h", tz="UTC"), "y": [0.1, 0.9] * 65})
    lookups, _, stats = fitted(contract, frame)
    snapshot = LookupSnapshot(index_lookups(lookups, contract), {})
    records = as_records(frame)
    batch = inputs(records, snapshot, contract, stats)
    for i in (0, 1, 2, 77, 129):
        one = inputs([records[i]], snapshot, contract, stats)
        np.testing.assert_array_equal(one[0][0], batch[0][i])
        np.testing.assert_array_equal(one[1][0], batch[1][i])
        assert one[2][0] == batch[2][i]


def test_an_empty_vocabulary_codes_every_value_unknown():
    """No training row had a value for a category: every value is unknown (0), in both."""
    contract = contract_for(None, "hour")
    frame = pd.DataFrame({"city": pd.array(["a", "b"], "string"), "n": pd.array([None, None], "Int64"),
                          "f": [1.0, 2.0], "flag": pd.array([True, None], "boolean"), "code": [1.0, 2.0],
                          "at": pd.to_datetime(["2024-01-01", "2024-07-01"], utc=True), "y": [0.0, 1.0]})
    lookups, joined, stats = fitted(contract, frame)
    assert stats.vocabularies["n"] == []
    joined["n"] = pd.array([3, 4], "Int64")
    assert transform(joined, contract, stats)["n"].tolist() == [0, 0]
    assert transform_pandas(joined, contract, stats)["n"].tolist() == [0, 0]


def test_an_expression_outside_arithmetic_is_refused_with_its_text():
    env = {"a": np.array([1.0, np.nan]), "b": np.array([0.0, 1.0])}
    np.testing.assert_array_equal(compile_expr("a / b + -a ** 2")(env), [np.inf, np.nan])
    np.testing.assert_array_equal(compile_expr("a >= 1")(env), [1.0, 0.0])
    with pytest.raises(TransformError, match=r"__import__\('os'\)"):
        compile_expr("__import__('os')")
    with pytest.raises(TransformError, match="not valid"):
        compile_expr("a +")


def etl_partitions(frame: pd.DataFrame, contract: DatasetContract, cut: int, dictionary: bool):
    """The Dask ETL's partition path on ``frame``: two Arrow partitions cut at ``cut`` (text
    read dictionary-encoded, as the ETL reads Parquet, when ``dictionary``)."""
    import pyarrow as pa

    from core.transform import arrow_lookups, prepare_partition

    table = pa.Table.from_pandas(frame, preserve_index=False)
    if dictionary:
        table = table.set_column(0, "city", table.column("city").dictionary_encode())
    lookups = arrow_lookups(prepare_lookups({"cities": lookup_table()}, contract), contract)
    return [prepare_partition(table.slice(start, length), lookups, contract)
            for start, length in ((0, cut), (cut, None))]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frame=trips(), zone=st.sampled_from(ZONES), part=st.sampled_from(["hour", "weekday", "month", "dayofyear"]),
       cut=st.integers(0, 40), dictionary=st.booleans())
def test_the_etl_partitions_give_the_pandas_statistics_and_transform(frame, zone, part, cut, dictionary):
    """What a Dask partition runs (Arrow join by key, derive, aggregates, encode) against the
    pandas transform of the same rows, labelled rows only."""
    from core.features import stats_from_partitions
    from core.transform import combine_aggregates, encode_partition, partition_aggregates

    contract = contract_for(zone, part)
    _, joined, stats = fitted(contract, frame)
    parts = etl_partitions(frame, contract, min(cut, len(frame)), dictionary)
    total = combine_aggregates([partition_aggregates(p, "2024-03-01", "2024-06-01") for p in parts])
    got_stats = stats_from_partitions(contract, total, "2024-03-01", "2024-06-01")
    assert got_stats.vocabularies == stats.vocabularies
    assert got_stats.train_rows == stats.train_rows
    np.testing.assert_allclose(got_stats.label_mean, stats.label_mean, rtol=1e-12, atol=1e-12)
    for name in contract.features.numeric:
        np.testing.assert_allclose(got_stats.means[name], stats.means[name], rtol=1e-9, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(got_stats.stds[name], stats.stds[name], rtol=1e-9, atol=1e-6, err_msg=name)
    expected = transform_pandas(joined, contract, stats)
    expected = expected[expected["label"].notna()].reset_index(drop=True)
    assert sum(p.unlabeled for p in parts) == len(frame) - len(expected)
    got = pd.concat([encode_partition(p, contract, stats).to_pandas() for p in parts], ignore_index=True)
    assert list(got.columns) == list(expected.columns)
    for name in contract.features.categorical:
        assert got[name].dtype == np.int32 and got[name].tolist() == expected[name].tolist(), name
    for name in contract.features.numeric:
        assert got[name].dtype == np.float32, name
        np.testing.assert_array_equal(got[name].to_numpy(), expected[name].to_numpy(), err_msg=name)
    assert got["split"].tolist() == expected["split"].astype(object).tolist()
    np.testing.assert_array_equal(got["label"].to_numpy(), expected["label"].to_numpy())
    assert (got["at"] == expected["at"]).sum() == expected["at"].notna().sum()


def test_the_etl_joins_by_several_keys_as_a_left_merge():
    """Two keys (text, time in another unit), unmatched and missing keys, a dictionary key."""
    import pyarrow as pa

    from core.transform import arrow_lookups, join_table

    contract = DatasetContract.model_validate({
        "name": "keys", "base_table": "rides",
        "tables": {
            "rides": {"source": {"kind": "file", "path": "r.csv"}, "columns": {
                "origin": {"type": "str", "nullable": True}, "at": {"type": "datetime", "nullable": True},
                "y": {"type": "float"}}},
            "weather": {"source": {"kind": "file", "path": "w.csv"}, "columns": {
                "origin": {"type": "str"}, "at": {"type": "datetime"}, "temp": {"type": "float"},
                "sky": {"type": "str"}}},
        },
        "joins": [{"table": "weather", "join_on": ["origin", "at"]}],
        "target": {"column": "y", "kind": "regression", "name": "label"},
        "features": {"categorical": ["sky"], "numeric": ["temp"]},
        "time_column": "at",
    })
    hours = pd.date_range("2024-01-01", periods=4, freq="h", tz="UTC")
    weather = pd.DataFrame({"origin": ["EWR", "EWR", "JFK", "JFK"], "at": hours[[0, 1, 0, 2]],
                            "temp": [1.0, 2.0, 3.0, 4.0], "sky": ["clear", None, "rain", "snow"]})
    rides = pd.DataFrame({"origin": pd.array(["JFK", "EWR", "LGA", None, "JFK", "EWR"], "string"),
                          "at": pd.Series(hours[[0, 1, 0, 0, 3, 0]]).astype("datetime64[us, UTC]"),
                          "y": [1.0] * 6})
    rides.loc[5, "at"] = pd.NaT
    lookups = prepare_lookups({"weather": weather}, contract)
    expected = join_lookups(rides, lookups, contract)
    table = pa.Table.from_pandas(rides, preserve_index=False)
    for text in (False, True):
        if text:
            table = table.set_column(0, "origin", table.column("origin").dictionary_encode())
        got = join_table(table, arrow_lookups(lookups, contract), contract)
        assert got["temp"].to_pylist() == [None if v != v else v for v in expected["temp"].tolist()]
        assert got["temp"].to_pylist() == [3.0, 2.0, None, None, None, None]
        assert got["sky"].to_pylist() == [None if v is None or v != v else v for v in expected["sky"].tolist()]
