"""Lake maintenance: compaction keeps the rows, vacuum keeps every version still named (a
feature table's raw versions, a registered model's feature version) and lets the rest go."""

from __future__ import annotations

import json

import pandas as pd
import pyarrow as pa
import pytest

from core.contract import DatasetContract
from core.lake import Lake
from tasks.maintain import maintain_table, named_versions

CONTRACT = DatasetContract.model_validate({
    "name": "live", "base_table": "events",
    "tables": {"events": {"source": {"kind": "stream", "stream": "s"}, "columns": {"id": {"type": "int"}, "at": {"type": "datetime"}}}},
    "target": {"column": "id", "kind": "regression"}, "features": {"categorical": [], "numeric": []},
    "time_column": "at"})


def test_compaction_keeps_rows_and_vacuum_keeps_exactly_the_named_versions(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    raw = lake.uri("raw", "live", "events")
    for batch in range(20):  # twenty micro-batch commits: versions 0..19, one small file each
        lake.append(raw, pa.table({"id": list(range(batch * 10, batch * 10 + 10))}), {"flywheel.batch": batch})
    at_5 = lake.read_pandas(raw, 5).sort_values("id").reset_index(drop=True)
    current = lake.read_pandas(raw).sort_values("id").reset_index(drop=True)
    features = lake.uri("features", "live")
    lake.append(features, pa.table({"x": [1.0]}), {"flywheel.raw_tables": json.dumps(
        {"events": {"uri": raw, "version": 5, "table_id": "t"}})})

    named = named_versions(lake, CONTRACT, [0])  # a registered model learnt from feature version 0
    assert named == {features: {0}, raw: {5}}
    done = maintain_table(lake, raw, named[raw], default_hours=0)
    assert done.files_before == 20 and done.files_after == 1
    assert done.version_after > done.version_before  # compaction, and vacuum start and end, are commits
    assert done.vacuumed_files == 20 - 6  # version 5 needs the first six files; the compacted one is new
    pd.testing.assert_frame_equal(lake.read_pandas(raw).sort_values("id").reset_index(drop=True), current)
    pd.testing.assert_frame_equal(lake.read_pandas(raw, 5).sort_values("id").reset_index(drop=True), at_5)
    with pytest.raises(Exception):  # noqa: B017 - an unnamed old version's files are gone
        lake.read_pandas(raw, 12)
