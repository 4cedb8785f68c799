"""Every bad input ends in one clear message: the file, table, column and rows are named, and a
problem is said once, not once per column or followed by contradictory type messages.

One test per finding reproduced by a user; each fails on the code before the fix.
"""

from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from core.contract import ContractError, TableSpec, load_contract
from core.validation import REASON_COLUMN, ValidationError, validate

REPO = Path(__file__).resolve().parent.parent
FLIGHTS = REPO / "config" / "datasets" / "flights.yaml"

SPEC = TableSpec.model_validate({
    "source": {"kind": "file", "path": "unused.csv"},
    "primary_key": ["id"],
    "max_bad_row_fraction": 0.5,
    "columns": {
        "id": {"type": "int", "min": 1},
        "city": {"type": "str", "allowed": ["NYC", "BOS", "SFO"]},
        "temp": {"type": "float", "nullable": True, "max_null_fraction": 0.5, "min": -50, "max": 130},
        "score": {"type": "float", "nullable": True, "max_null_fraction": 0.5},  # no bounds
        "seen_at": {"type": "datetime"},
    },
})


def batch(n: int = 10) -> pd.DataFrame:
    return pd.DataFrame({
        "id": range(1, n + 1),
        "city": (["NYC", "BOS", "SFO"] * n)[:n],
        "temp": np.linspace(10, 90, n),
        "score": np.linspace(0, 1, n),
        "seen_at": pd.date_range("2013-01-01", periods=n, freq="h").strftime("%Y-%m-%dT%H:%M:%SZ"),
    })


def contract_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "flights.yaml"
    path.write_text(text)
    return path


# 1. A YAML syntax error names the file, line, column and problem in a few lines.
def test_yaml_syntax_error_names_file_line_and_column(tmp_path: Path):
    path = contract_file(tmp_path, FLIGHTS.read_text().replace("base_table: flights", "base_table: flights: x"))
    with pytest.raises(ContractError) as info:
        load_contract(path)
    message = str(info.value)
    assert message.splitlines()[0] == (
        f"invalid YAML in dataset contract {path}, line 5, column 20: mapping values are not allowed here")
    assert "base_table: flights: x" in message  # the offending line, with a caret under the column
    assert len(message.splitlines()) <= 4
    assert info.value.__suppress_context__  # no chained YAML traceback


@pytest.mark.parametrize(("text", "got"), [
    ("- name: flights\n- tables: {}\n", "got a list"),
    ("", "got an empty file"),
    ("flights\n", "got a str ('flights')"),
])
def test_contract_that_is_not_a_mapping_is_named(tmp_path: Path, text: str, got: str):
    path = contract_file(tmp_path, text)
    with pytest.raises(ContractError, match="expected a mapping") as info:
        load_contract(path)
    assert str(path) in str(info.value) and got in str(info.value)


# 2. A header-only CSV is one failure, with no type or column messages after it.
def test_header_only_csv_is_one_failure():
    header_only = pd.read_csv(io.StringIO(batch().head(0).to_csv(index=False)))
    result = validate(header_only, "weather", SPEC)
    assert result.rejected
    assert [str(f) for f in result.failures] == ["weather: the batch has no rows (only a header?)"]
    assert result.accepted.empty and result.quarantined.empty


# 3. inf and -inf are quarantined by default, row by row; allow_non_finite accepts them.
def test_non_finite_numbers_are_quarantined_unless_allowed():
    data = batch()
    data.loc[3, "score"] = np.inf
    data.loc[6, "score"] = -np.inf
    data.loc[8, "score"] = np.nan  # a null: nullable and max_null_fraction govern it, as before
    result = validate(data, "t", SPEC)
    assert not result.rejected
    reasons = dict(zip(result.quarantined["id"], result.quarantined[REASON_COLUMN], strict=True))
    assert reasons == {4: "values_to_be_finite(score)", 7: "values_to_be_finite(score)"}
    assert [str(f) for f in result.failures] == [
        "expect_column_values_to_be_finite(score): 2 rows are inf or -inf, first at rows 3, 6: inf, -inf "
        "(allow_non_finite: true accepts them)"]
    assert 9 in set(result.accepted["id"])

    columns = {**SPEC.columns, "score": SPEC.columns["score"].model_copy(update={"allow_non_finite": True})}
    allowed = validate(data, "t", SPEC.model_copy(update={"columns": columns}))
    assert not allowed.rejected and allowed.quarantined.empty and len(allowed.accepted) == 10


def test_non_finite_in_an_int_column_is_quarantined_not_a_type_failure():
    data = batch().astype({"id": "float64"})
    data.loc[2, "id"] = np.inf
    result = validate(data, "t", SPEC)
    assert not result.rejected
    assert list(result.quarantined.index) == [2]
    assert "values_to_be_finite(id)" in result.quarantined.loc[2, REASON_COLUMN]


def test_allow_non_finite_is_for_float_columns():
    with pytest.raises(ValueError, match="allow_non_finite applies to float columns only, not int"):
        TableSpec.model_validate({"source": {"kind": "file", "path": "x.csv"},
                                  "columns": {"n": {"type": "int", "allow_non_finite": True}}})


# 4. The split's boundaries are checked when the contract loads.
@pytest.mark.parametrize(("train_end", "expected"), [
    ("2013-12-01", "split.train_end '2013-12-01' must be before split.validation_end '2013-11-01'"),
    ("2013-11-01", "split.train_end '2013-11-01' must be before split.validation_end '2013-11-01'"),
    ("2013-13-45", "split.train_end '2013-13-45' is not a date"),
])
def test_split_boundaries_are_checked_at_load(tmp_path: Path, train_end: str, expected: str):
    text = FLIGHTS.read_text().replace('train_end: "2013-10-01"', f'train_end: "{train_end}"')
    with pytest.raises(ContractError) as info:
        load_contract(contract_file(tmp_path, text))
    assert str(tmp_path / "flights.yaml") in str(info.value) and expected in str(info.value)


# 5. Missing columns are one failure; a file read with the wrong delimiter says which to set.
def test_semicolon_csv_read_with_commas_says_which_delimiter_to_set():
    wrong = pd.read_csv(io.StringIO(batch().to_csv(index=False, sep=";")))
    assert list(wrong.columns) == ["id;city;temp;score;seen_at"]
    result = validate(wrong, "t", SPEC)
    assert result.rejected
    assert [str(f) for f in result.failures] == [
        "5 columns are missing: 'id', 'city', 'temp', 'score', 'seen_at': the file looks ';'-delimited: "
        "set read_options: {sep: ';'} in the contract"]


def test_several_missing_columns_are_one_failure():
    result = validate(batch().rename(columns={"temp": "temperature", "city": "town"}), "t", SPEC)
    assert [str(f) for f in result.failures] == [
        "2 columns are missing: 'city', 'temp' (the batch has unexpected columns ['town', 'temperature']: "
        "renamed?)"]


# 6. Text in a number or datetime column names the first offending rows and their values.
def test_text_in_a_number_column_names_rows_and_values():
    data = batch()
    data["temp"] = data["temp"].astype(object)
    data.loc[[2, 7, 9], "temp"] = ["n/a", "abc", "--"]
    result = validate(data, "t", SPEC)
    assert result.rejected
    assert [str(f) for f in result.failures] == [
        "column 'temp' (float): 3 values are not numbers, first at rows 2, 7, 9: 'n/a', 'abc', '--'"]


def test_unparseable_datetimes_name_rows_and_values():
    data = batch()
    data.loc[[1, 4], "seen_at"] = ["soon", "31/31/2013"]
    result = validate(data, "t", SPEC)
    assert [str(f) for f in result.failures] == [
        "column 'seen_at' (datetime): 2 values are not datetimes, first at rows 1, 4: 'soon', '31/31/2013'"]


# 7. Row-level failures name the first offending rows and their values.
def test_row_level_failures_name_rows_and_values():
    data = pd.concat([batch(20), batch(20).iloc[[0]]], ignore_index=True)
    data.loc[[2, 4], "temp"] = [500.0, -99.0]
    data.loc[5, "city"] = "LAX"
    data.loc[6, "city"] = None
    result = validate(data, "t", SPEC)
    assert not result.rejected
    assert sorted(str(f) for f in result.failures) == [
        "expect_column_values_to_be_between(temp): 2 rows outside [-50.0, 130.0], first at rows 2, 4: "
        "500.0, -99.0",
        "expect_column_values_to_be_in_set(city): 1 row not in the allowed set, at row 5: 'LAX'",
        "expect_column_values_to_be_unique(id): 2 rows repeat a key, first at rows 0, 20: 1, 1",
        "expect_column_values_to_not_be_null(city): 1 row is null, at row 6",
    ]


def test_at_most_five_rows_are_named():
    data = batch(20)
    data.loc[[1, 3, 5, 7, 9, 11], "temp"] = 999.0
    result = validate(data, "t", SPEC)
    assert [str(f) for f in result.failures] == [
        "expect_column_values_to_be_between(temp): 6 rows outside [-50.0, 130.0], first at rows 1, 3, 5, 7, 9: "
        "999.0, 999.0, 999.0, 999.0, 999.0"]


# 8. ValidationError names the table and where its batch came from.
def test_validation_error_names_table_and_source():
    result = validate(batch().head(0), "weather", SPEC, None, "flights.", source="file /data/weather.csv")
    assert result.source == "file /data/weather.csv"
    message = str(ValidationError([result]))
    assert "weather from file /data/weather.csv: rejected (0 rows): " \
        "weather: the batch has no rows (only a header?)" in message
    # Without a source the line is as before.
    assert "  weather: rejected (0 rows)" in str(ValidationError([validate(batch().head(0), "weather", SPEC)]))


# 9. rows in == accepted + quarantined is checked explicitly, so python -O keeps the check.
def test_lost_rows_raise_even_without_asserts(monkeypatch):
    import core.validation as gate

    gate.check_invariant(validate(batch(), "t", SPEC))  # a whole batch passes the check
    conform = gate.conform

    def conform_losing_a_row(frame: pd.DataFrame, spec: TableSpec):
        conformed, failures, warnings = conform(frame, spec)
        return conformed.iloc[1:], failures, warnings

    monkeypatch.setattr(gate, "conform", conform_losing_a_row)
    with pytest.raises(RuntimeError, match=r"t: the gate lost rows: 10 rows in, but 9 accepted \+ 0 quarantined"):
        gate.validate(batch(), "t", SPEC)
    source = Path(gate.__file__).read_text()
    assert not any(isinstance(node, ast.Assert) for node in ast.walk(ast.parse(source)))
