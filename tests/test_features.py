"""The one feature transform: derived features, encoding, stats fitted on training rows only,
and the same features from the Dask ETL as from the plain pandas function."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from core.contract import DatasetContract
from core.features import SPLIT_COLUMN, derive, fit_stats, join_lookups, prepare_lookups, transform


@pytest.fixture(scope="module")
def tiny_contract() -> DatasetContract:
    return DatasetContract.model_validate({
        "name": "tiny",
        "base_table": "trips",
        "tables": {
            "trips": {"source": {"kind": "file", "path": "x.csv"}, "columns": {
                "trip_id": {"type": "int"}, "city": {"type": "str"}, "km": {"type": "float"},
                "minutes": {"type": "float", "nullable": True, "max_null_fraction": 0.5},
                "at": {"type": "datetime"}}},
            "cities": {"source": {"kind": "file", "path": "y.csv"}, "columns": {
                "name": {"type": "str"}, "population": {"type": "float"}}},
        },
        "joins": [{"table": "cities", "left_on": ["city"], "right_on": ["name"],
                   "columns": ["population"], "suffix": "_city"}],
        "derived": [{"name": "speed", "op": "expr", "expr": "km / minutes"},
                    {"name": "hour", "op": "hour", "column": "at", "timezone": "America/New_York"},
                    {"name": "city_hour", "op": "concat", "columns": ["city", "hour"]}],
        "target": {"column": "minutes", "kind": "binary", "threshold": 30, "name": "slow"},
        "features": {"categorical": ["city", "hour"], "numeric": ["km", "population_city"]},
        "time_column": "at",
        "split": {"train_end": "2024-01-03", "validation_end": "2024-01-04"},
    })


def trips() -> pd.DataFrame:
    return pd.DataFrame({
        "trip_id": [1, 2, 3, 4, 5],
        "city": ["NYC", "NYC", "BOS", "SFO", "LAX"],
        "km": [10.0, 20.0, 30.0, 40.0, 50.0],
        "minutes": [20.0, 40.0, np.nan, 60.0, 10.0],
        "at": pd.to_datetime(["2024-01-01T15:00Z", "2024-01-02T15:00Z", "2024-01-02T16:00Z",
                              "2024-01-03T12:00Z", "2024-01-05T12:00Z"], utc=True),
    })


def cities() -> pd.DataFrame:
    return pd.DataFrame({"name": ["NYC", "BOS", "SFO"], "population": [8.3e6, 0.65e6, 0.8e6]})


def test_join_and_derive(tiny_contract):
    joined = join_lookups(trips(), prepare_lookups({"cities": cities()}, tiny_contract), tiny_contract)
    assert list(joined["population_city"].fillna(-1)) == [8.3e6, 8.3e6, 0.65e6, 0.8e6, -1]
    derived = derive(joined, tiny_contract)
    assert list(derived["hour"]) == [10, 10, 11, 7, 7]  # New York local time
    assert derived["speed"].iloc[0] == 0.5
    assert list(derived["city_hour"])[:2] == ["NYC-10", "NYC-10"]
    # minutes [20, 40, NaN, 60, 10] against the threshold 30; no minutes, no label.
    labels = derived["slow"].to_numpy(dtype=float)
    assert labels[[0, 1, 3, 4]].tolist() == [0.0, 1.0, 1.0, 0.0] and np.isnan(labels[2])


def test_stats_fit_on_training_rows_only_and_unknowns_encode_to_zero(tiny_contract):
    joined = join_lookups(trips(), prepare_lookups({"cities": cities()}, tiny_contract), tiny_contract)
    derived = derive(joined, tiny_contract)
    stats = fit_stats(derived, tiny_contract, "2024-01-03T00:00:00+00:00", "2024-01-04T00:00:00+00:00")
    # Row 3 has no label and rows 4-5 are after train_end: training rows are trips 1 and 2.
    assert stats.train_rows == 2 and stats.vocabularies["city"] == ["NYC"]
    assert stats.means["km"] == 15.0 and stats.label_mean == 0.5
    features = transform(joined, tiny_contract, stats)
    assert features["city"].tolist() == [1, 1, 0, 0, 0]  # BOS, SFO, LAX unseen in training
    assert features[SPLIT_COLUMN].tolist() == ["train", "train", "train", "validation", "test"]
    assert features["km"].dtype == np.float32 and features["city"].dtype == np.int32
    assert features["population_city"].iloc[4] == 0.0  # missing -> training mean -> 0


def test_stats_are_deterministic_and_fingerprinted(tiny_contract):
    joined = join_lookups(trips(), prepare_lookups({"cities": cities()}, tiny_contract), tiny_contract)
    derived = derive(joined, tiny_contract)
    first = fit_stats(derived, tiny_contract, "2024-01-06", "2024-01-07")
    second = fit_stats(derived.sample(frac=1, random_state=1), tiny_contract, "2024-01-06", "2024-01-07")
    assert first.fingerprint() == second.fingerprint()


def test_contract_errors_are_clear(tmp_path):
    from core.contract import ContractError, load_contract

    (tmp_path / "bad.yaml").write_text("name: bad\nbase_table: nope\ntables: {}\n")
    with pytest.raises(ContractError, match="invalid dataset contract"):
        load_contract(tmp_path / "bad.yaml")
    with pytest.raises(ContractError, match="not found"):
        load_contract("missing", datasets_dir=tmp_path)


def test_non_finite_numbers_a_contract_allows_are_missing_values_to_the_features(tiny_contract):
    """Found: inf in a float column set that column's scaling to mean 0 / std 1 and the
    encoded features held inf, which training could not use."""
    frame = trips()
    frame.loc[0, "km"] = np.inf
    frame.loc[3, "km"] = -np.inf
    joined = join_lookups(frame, prepare_lookups({"cities": cities()}, tiny_contract), tiny_contract)
    derived = derive(joined, tiny_contract)
    stats = fit_stats(derived, tiny_contract, "2024-01-03", "2024-01-04")
    assert stats.means["km"] == 20.0  # the one finite labelled training value (row 0 is inf)
    features = transform(joined, tiny_contract, stats)
    assert np.isfinite(features["km"]).all()
    assert features.loc[[0, 3], "km"].tolist() == [0.0, 0.0]  # missing: imputed at the mean


def test_the_indexed_join_serving_uses_equals_the_merge_the_etl_uses():
    """Keys of every kind (a UTC time and a string; an int against floats), matches and misses,
    rows of differing dtypes: records joined as serving joins them encode as the merged rows."""
    from core.features import index_lookups
    from core.transform import encode_records

    contract = DatasetContract.model_validate({
        "name": "two_joins", "base_table": "flights",
        "tables": {
            "flights": {"source": {"kind": "file", "path": "x.csv"}, "columns": {
                "origin": {"type": "str"}, "at": {"type": "datetime"}, "plane": {"type": "int"},
                "delay": {"type": "float"}}},
            "weather": {"source": {"kind": "file", "path": "w.csv"}, "columns": {
                "origin": {"type": "str"}, "at": {"type": "datetime"}, "temp": {"type": "float"},
                "sky": {"type": "str"}}},
            "planes": {"source": {"kind": "file", "path": "p.csv"}, "columns": {
                "id": {"type": "int"}, "seats": {"type": "int"}, "maker": {"type": "str"}}},
        },
        "joins": [{"table": "weather", "join_on": ["origin", "at"], "columns": ["temp", "sky"]},
                  {"table": "planes", "left_on": ["plane"], "right_on": ["id"], "columns": ["seats", "maker"],
                   "suffix": "_plane"}],
        "target": {"column": "delay", "kind": "binary", "threshold": 15, "name": "late"},
        "features": {"categorical": ["origin", "sky", "maker_plane", "seats_plane"], "numeric": ["temp"]},
        "time_column": "at", "split": {"train_end": "2024-01-01T03:00Z", "validation_end": "2024-01-01T04:00Z"},
    })
    hours = pd.date_range("2024-01-01", periods=6, freq="h", tz="UTC")
    weather = pd.DataFrame({"origin": ["EWR", "JFK"] * 3, "at": hours.repeat(1), "temp": np.arange(6.0),
                            "sky": ["clear", "rain", None, "snow", "clear", "fog"]})
    planes = pd.DataFrame({"id": [1, 2, 3], "seats": [150, 200, 180], "maker": ["A", "B", None]})
    stats = None
    for frame in (pd.DataFrame({  # matches, misses, a missing key; times in another zone
            "origin": ["EWR", "JFK", "LGA", "EWR", None], "plane": [1, 2, 9, 3, 1],
            "at": pd.to_datetime(["2024-01-01T00:00Z", "2024-01-01T01:00Z", "2024-01-01T02:00Z",
                                  "2024-01-01T04:00Z", "2024-01-01T05:00Z"], utc=True).tz_convert("America/New_York"),
            "delay": [1.0, 30.0, 5.0, np.nan, 20.0]}),
            pd.DataFrame({"origin": ["EWR"], "plane": [2], "delay": [1.0],  # every row matches
                          "at": pd.to_datetime(["2024-01-01T00:00Z"], utc=True)})):
        prepared = prepare_lookups({"weather": weather, "planes": planes}, contract)
        merged = join_lookups(frame, prepared, contract)
        by_merge = frame.merge(prepared["weather"], how="left", on=["origin", "at"]).merge(
            prepared["planes"], how="left", on=["plane"])
        pd.testing.assert_frame_equal(merged.astype(str), by_merge.astype(str))  # the merge's rows, by lookup
        if stats is None:  # fitted on the first frame, used for both
            stats = fit_stats(derive(merged, contract), contract, "2024-01-01T03:00Z", "2024-01-01T04:00Z")
        records = [{k: (None if pd.isna(v) else v.to_pydatetime() if isinstance(v, pd.Timestamp) else v)
                    for k, v in row.items()} for row in frame.drop(columns=["delay"]).to_dict("records")]
        categorical, numeric, missing = encode_records(records, index_lookups(prepared, contract), contract, stats)
        expected = transform(merged, contract, stats)
        np.testing.assert_array_equal(categorical, expected[contract.features.categorical].to_numpy(np.int64))
        np.testing.assert_array_equal(numeric, expected[contract.features.numeric].to_numpy(np.float32))
        if len(frame) > 1:
            assert missing["weather"].tolist() == [False, False, True, False, True]
            assert missing["planes"].tolist() == [False, False, True, False, False]
