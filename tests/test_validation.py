"""The validation gate on bad input: every batch is accepted + quarantined, or rejected whole
with the failed expectations named."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.contract import TableSpec
from core.sources import FileBatchSource, SourceError
from core.validation import REASON_COLUMN, validate

SPEC = TableSpec.model_validate({
    "source": {"kind": "file", "path": "unused.csv"},
    "primary_key": ["id"],
    "max_bad_row_fraction": 0.3,
    "columns": {
        "id": {"type": "int", "min": 1},
        "city": {"type": "str", "allowed": ["NYC", "BOS", "SFO"]},
        "temp": {"type": "float", "nullable": True, "max_null_fraction": 0.5, "min": -50, "max": 130},
        "seen_at": {"type": "datetime"},
    },
})


def good_batch(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "id": range(1, n + 1),
        "city": (["NYC", "BOS", "SFO"] * n)[:n],
        "temp": np.linspace(10, 90, n),
        "seen_at": pd.date_range("2013-01-01", periods=n, freq="h").strftime("%Y-%m-%dT%H:%M:%SZ"),
    })


def check_invariant(result, batch):
    assert result.rows_in == len(batch)
    if not result.rejected:
        assert len(result.accepted) + len(result.quarantined) == len(batch)


def test_good_batch_is_accepted_whole():
    batch = good_batch()
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    assert not result.rejected and len(result.accepted) == 10 and result.quarantined.empty
    assert str(result.accepted["seen_at"].dtype).startswith("datetime64")


def test_out_of_range_and_unknown_category_rows_are_quarantined_with_reasons():
    batch = good_batch()
    batch.loc[2, "temp"] = 500.0
    batch.loc[5, "city"] = "LAX"
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    assert not result.rejected
    reasons = dict(zip(result.quarantined["id"], result.quarantined[REASON_COLUMN], strict=True))
    assert reasons == {3: "column_values_to_be_between(temp)", 6: "column_values_to_be_in_set(city)"}
    assert 3 not in set(result.accepted["id"])


def test_duplicate_keys_are_quarantined():
    batch = pd.concat([good_batch(), good_batch().iloc[[0]]], ignore_index=True)
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    assert list(result.quarantined["id"]) == [1, 1]
    assert set(result.quarantined[REASON_COLUMN]) == {"column_values_to_be_unique(id)"}


def test_too_many_bad_rows_reject_the_batch_whole():
    batch = good_batch()
    batch.loc[:5, "city"] = "LAX"
    result = validate(batch, "t", SPEC)
    assert result.rejected
    assert "6 of 10 rows (60.00%)" in result.describe_failures()
    assert "above the contract's limit of 30.00%" in result.describe_failures()


def test_empty_batch_is_rejected():
    result = validate(good_batch().iloc[0:0], "t", SPEC)
    assert result.rejected
    assert result.describe_failures() == "t: the batch has no rows (only a header?)"


def test_all_null_column_is_rejected_naming_the_column():
    batch = good_batch()
    batch["temp"] = np.nan
    result = validate(batch, "t", SPEC)
    assert result.rejected
    assert "expect_column_values_to_not_be_null(temp): 100.0% nulls" in result.describe_failures()


def test_all_null_required_column_rejects_via_quarantine_share():
    batch = good_batch()
    batch["city"] = None
    result = validate(batch, "t", SPEC)
    assert result.rejected
    assert "10 of 10 rows" in result.describe_failures()


def test_wrong_dtype_is_rejected_naming_column_and_type():
    batch = good_batch()
    batch["temp"] = batch["temp"].astype(str)
    batch.loc[0, "temp"] = "warm"
    result = validate(batch, "t", SPEC)
    assert result.rejected
    # Named once, with the row and value; the range check on the same text says nothing more.
    assert result.describe_failures() == "column 'temp' (float): 1 value is not a number, at row 0: 'warm'"


def test_unparseable_datetime_is_rejected():
    batch = good_batch()
    batch.loc[3, "seen_at"] = "yesterday-ish"
    result = validate(batch, "t", SPEC)
    assert result.rejected
    assert result.describe_failures() == \
        "column 'seen_at' (datetime): 1 value is not a datetime, at row 3: 'yesterday-ish'"


def test_renamed_column_is_rejected_with_a_hint():
    batch = good_batch().rename(columns={"temp": "temperature"})
    result = validate(batch, "t", SPEC)
    assert result.rejected
    assert "column 'temp' is missing (the batch has unexpected columns ['temperature']: renamed?)" \
        in result.describe_failures()


def test_extra_column_is_dropped_with_a_warning_or_rejected_by_contract():
    batch = good_batch().assign(note="x")
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    assert not result.rejected and "note" not in result.accepted
    assert result.warnings == ["dropped columns not in the contract: ['note']"]
    strict = SPEC.model_copy(update={"extra_columns": "reject"})
    assert validate(batch, "t", strict).rejected


def test_truncated_csv_is_a_clear_source_error(tmp_path: Path):
    from core.contract import FileSource

    path = tmp_path / "t.csv.gz"
    import gzip

    path.write_bytes(gzip.compress(good_batch().to_csv(index=False).encode())[:40])
    with pytest.raises(SourceError, match="truncated or not valid csv"):
        FileBatchSource("t", FileSource(kind="file", path=str(path))).read()


def test_data_docs_written_for_a_rejected_batch(tmp_path: Path):
    batch = good_batch().rename(columns={"city": "town"})
    result = validate(batch, "t", SPEC, docs_root=tmp_path)
    assert result.rejected and result.data_docs is not None and result.data_docs.exists()
    pages = list((result.data_docs.parent / "validations").rglob("*.html"))
    assert len(pages) == 1  # the validation result of this batch, linked from index.html
    text = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", pages[0].read_text(), flags=re.S)
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))
    # The failed column-set expectation, with what it expected and what the batch had.
    assert "Must have at least these columns (in any order): id , city , temp , seen_at" in text
    assert "['id', 'seen_at', 'temp']" in text


@pytest.mark.parametrize("seed", range(5))
def test_rows_in_equals_accepted_plus_quarantined_on_random_damage(seed: int):
    rng = np.random.default_rng(seed)
    batch = good_batch(200)
    damaged = rng.choice(200, size=int(rng.integers(0, 50)), replace=False)
    batch.loc[damaged, "temp"] = rng.choice([999.0, -999.0, np.nan], size=len(damaged))
    batch.loc[rng.choice(200, 5), "city"] = "???"
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    if not result.rejected:
        assert set(result.accepted["id"]).isdisjoint(result.quarantined["id"])
        assert set(result.accepted["id"]) | set(result.quarantined["id"]) == set(batch["id"])


def test_real_weather_data_quarantines_the_1048_mph_reading(flights_contract, flights_raw):
    result = validate(flights_raw["weather"], "weather", flights_contract.tables["weather"])
    check_invariant(result, flights_raw["weather"])
    assert not result.rejected
    assert list(result.quarantined["wind_speed"].round(2)) == [1048.36]


def test_text_with_control_characters_is_quarantined_naming_the_column():
    """The service refuses a record whose text holds a control character (a NUL in dest was
    accepted); the gate quarantines such a row, as it would any other bad value."""
    spec = TableSpec.model_validate({**SPEC.model_dump(), "columns": {**SPEC.model_dump()["columns"],
                                                                       "note": {"type": "str", "nullable": True,
                                                                                "max_null_fraction": 1.0}}})
    batch = good_batch().assign(note=["fine", "tab\tand\nline", "nul\x00here", "bell\x07", None] + ["ok"] * 5)
    result = validate(batch, "t", spec)
    check_invariant(result, batch)
    assert not result.rejected and len(result.accepted) == 8
    reasons = dict(zip(result.quarantined["id"], result.quarantined[REASON_COLUMN], strict=True))
    assert reasons == {i: "column_values_to_not_match_regex(note)" for i in (3, 4)}, reasons


def test_a_time_without_a_zone_is_quarantined_unless_the_contract_names_the_zone():
    """Found: '2013-01-01T05:00:00' was read as UTC at ingest, silently five hours off for a
    New York clock. Now such a row is quarantined, naming the column; a contract that declares
    the zone to assume reads it in that zone."""
    batch = good_batch()
    batch.loc[3, "seen_at"] = "2013-01-01 03:00:00"  # no zone
    batch.loc[4, "seen_at"] = "2013-01-01T04:00:00-05:00"  # a zone, not Z
    result = validate(batch, "t", SPEC)
    check_invariant(result, batch)
    assert list(result.quarantined["id"]) == [4]
    assert result.quarantined[REASON_COLUMN].iloc[0] == "values_to_have_time_zone(seen_at)"
    (failure,) = [f for f in result.failures if f.column == "seen_at"]
    assert "at row 3: '2013-01-01 03:00:00'" in failure.message and "timezone:" in failure.message
    assert result.accepted.loc[result.accepted["id"] == 5, "seen_at"].iloc[0] == pd.Timestamp("2013-01-01 09:00")

    columns = {**SPEC.model_dump()["columns"], "seen_at": {"type": "datetime", "timezone": "America/New_York"}}
    declared = TableSpec.model_validate({**SPEC.model_dump(), "columns": columns})
    result = validate(batch, "t", declared)
    assert result.quarantined.empty
    at = dict(zip(result.accepted["id"], result.accepted["seen_at"], strict=True))
    assert at[4] == pd.Timestamp("2013-01-01 08:00")  # 03:00 in New York is 08:00 UTC
    assert at[5] == pd.Timestamp("2013-01-01 09:00") and at[1] == pd.Timestamp("2013-01-01 00:00")


def _failed_alone(frame: pd.DataFrame, spec: TableSpec) -> set[tuple[str, str | None]]:
    """The contract's expectations that fail when Great Expectations runs each on its own."""
    import great_expectations as gx

    from core.validation import _batch_definition, build_expectations, gx_context

    expectations = build_expectations(spec, [c for c in spec.columns if c in frame.columns])
    batch = _batch_definition(gx_context(None), "reference").get_batch(batch_parameters={"dataframe": frame})
    result = batch.validate(gx.ExpectationSuite(name="reference", expectations=expectations),
                            result_format={"result_format": "BOOLEAN_ONLY"})
    return {(r.expectation_config.type, r.expectation_config.kwargs.get("column"))
            for r in result.results if not r.success}


WIDE = TableSpec.model_validate({**SPEC.model_dump(), "columns": {
    **SPEC.model_dump()["columns"],
    "note": {"type": "str", "nullable": True, "max_null_fraction": 1.0},
    "flag": {"type": "bool", "nullable": True, "max_null_fraction": 0.2},
    "n": {"type": "int", "nullable": True, "max_null_fraction": 0.5, "min": 0, "max": 10},
}})


def wide_batch(n: int = 20) -> pd.DataFrame:
    return good_batch(n).assign(note=(["a", "b", None, "c"] * n)[:n], flag=([True, False] * n)[:n],
                                n=([1, None, 3, 10] * n)[:n])


DAMAGE = {
    "clean": lambda b: b,
    "range": lambda b: b.assign(temp=b["temp"].where(b.index != 3, 500.0), n=b["n"].where(b.index != 4, 11)),
    "set and nulls": lambda b: b.assign(city=b["city"].where(b.index % 7 != 1, None).where(b.index != 2, "LAX")),
    "null share": lambda b: b.assign(flag=b["flag"].where(b.index % 2 == 0, None)),
    "control characters": lambda b: b.assign(note=b["note"].where(b.index != 5, "bell\x07")),
    "inf": lambda b: b.assign(temp=b["temp"].where(b.index != 6, np.inf)),
    "mixed object column": lambda b: b.assign(note=b["note"].astype(object).where(b.index != 1, 7)),
    "bool in a float column": lambda b: b.assign(temp=[True] * len(b)),
    "duplicate key": lambda b: b.assign(id=b["id"].where(b.index != 9, 1)),
    "all null": lambda b: b.assign(note=None, n=None),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_the_combined_first_pass_finds_what_every_expectation_alone_finds(damage: str):
    """The gate's first pass decides most checks with one combined expectation; the contract's
    own expectations that it names broken must be exactly those that fail when run one by one."""
    from core.validation import build_expectations, conform, run_suite

    frame, _, _ = conform(DAMAGE[damage](wide_batch()), WIDE)
    expectations = build_expectations(WIDE, [c for c in WIDE.columns if c in frame.columns])
    first_pass, results = run_suite(frame, "t", expectations)
    found = {(r.expectation_config.type, r.expectation_config.kwargs.get("column"))
             for r in results if not r.success}
    assert found == _failed_alone(frame, WIDE)
    assert first_pass < len(expectations) / 3


def test_a_clean_batch_costs_a_few_great_expectations_expectations():
    """Great Expectations' cost is a fixed few milliseconds per expectation: a clean batch's
    checks are decided by one combined expectation beside the row count, column set and key."""
    result = validate(good_batch(), "t", SPEC)
    assert not result.rejected and result.quarantined.empty
    assert result.first_pass == 4 and result.evaluated > 3 * result.first_pass

    # The combined check passes on its own (it does not fail and fall back to the standard
    # expectations, which would give the same answer, slowly): it errs on nothing here.
    from core.gx_checks import broken_checks
    from core.validation import build_expectations, conform, plan_first_pass

    frame, _, _ = conform(good_batch(), SPEC)
    combined, *_ = plan_first_pass(build_expectations(SPEC, list(SPEC.columns)), frame)[0]
    assert broken_checks(frame, combined.checks) == []


def test_zone_detection_reads_each_distinct_value_once_with_the_same_answer():
    from core.validation import ZONE_PATTERN, _zoned

    values = pd.Series(["2013-01-01T05:00:00Z", "2013-01-01 05:00:00", None, np.nan, 5,
                        " 2013-01-01 05:00:00+01:00 ", "2013-01-01 05:00:00", "2013-01-01T05:00:00Z"] * 3,
                       dtype=object)
    direct = values.astype("string").str.strip().str.contains(ZONE_PATTERN, regex=True, na=True)
    assert _zoned(values).tolist() == direct.to_numpy(dtype=bool).tolist()
    assert _zoned(values.iloc[0:0]).tolist() == []
    assert _zoned(pd.Series([None, None], dtype=object)).tolist() == [True, True]
