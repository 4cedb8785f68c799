"""Secrets never leak: ${VARS} reach the server, descriptions, errors and logs mask them, and a
rejected credential is not retried. Real HTTP and PostgreSQL servers on 127.0.0.1."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest
from pydantic import ValidationError

from core.contract import ContractError, FileSource, HttpSource, SqlSource, expand
from core.secrets import SECRET_NAMES, is_secret_name, mask_text, mask_url
from core.sources import (
    FileBatchSource,
    HttpBatchSource,
    SourceError,
    SqlBatchSource,
    TransientSourceError,
    expand_values,
)
from tests.conftest import JsonHandler

FRAME = pd.DataFrame({"id": [1, 2, 3], "name": ["a", "b", "c"], "value": [0.5, 1.5, 2.5]})
API_KEY = "key-5e1f9a"
TOKEN = "tok-77c0d2"
CLIENT_SECRET = "cs-a83b11"


# --- masking ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(SECRET_NAMES | {"api-key", "PASSWORD", "Api_Key"}))
def test_every_secret_query_name_is_masked(name: str):
    url = f"https://api.example.com/v1/items?page=2&{name}=s3cr3t&limit=10"
    assert mask_url(url) == f"https://api.example.com/v1/items?page=2&{name}=***&limit=10"


@pytest.mark.parametrize("name", ["x_api_key", "aws_secret_access_key", "X-Amz-Signature",
                                  "X-Amz-Credential", "X-Amz-Security-Token", "accessToken",
                                  "client.secret", "api%5Fkey"])
def test_secret_names_match_as_suffixes(name: str):
    assert is_secret_name(name)
    assert mask_url(f"s3://bucket/k.csv?{name}=abc") == f"s3://bucket/k.csv?{name}=***"


@pytest.mark.parametrize("name", ["page", "limit", "monkey", "bypass", "keys", "sessions", "q"])
def test_ordinary_names_are_not_secret(name: str):
    assert not is_secret_name(name)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql+psycopg://flywheel:hunter2@db.internal:5432/sales",
         "postgresql+psycopg://flywheel:***@db.internal:5432/sales"),
        ("postgresql://u:p%40ss@h/db?sslmode=require&password=pw",
         "postgresql://u:***@h/db?sslmode=require&password=***"),
        ("https://u:pa@ss@host/a", "https://u:***@host/a"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("https://app.example.com/cb#access_token=abc&state=xyz",
         "https://app.example.com/cb#access_token=***&state=xyz"),
        ("cannot read https://h/data.csv?sig=abc123, giving up.",
         "cannot read https://h/data.csv?sig=***, giving up."),
        ("failed (see https://bob:pw@h/x?token=t1).", "failed (see https://bob:***@h/x?token=***)."),
        ("Max retries exceeded with url: /none?api_key=abc (Caused by NewConnectionError)",
         "Max retries exceeded with url: /none?api_key=*** (Caused by NewConnectionError)"),
        ("host=db user=u password=pw dbname=x", "host=db user=u password=*** dbname=x"),
        ("{'key': 'AKIA1', 'secret': 's', 'anon': False}",
         "{'key': '***', 'secret': '***', 'anon': False}"),
        ("Authorization: Bearer eyJhbGciOi.payload-x", "Authorization: Bearer ***"),
    ],
)
def test_mask_text(text: str, masked: str):
    assert mask_text(text) == masked


@pytest.mark.parametrize("text", [
    "https://api.example.com/v1/items?page=2&limit=10#top",
    "postgresql+psycopg://flywheel@127.0.0.1:5432/postgres",
    "s3://bucket/year=2024/key=abc/part-0.parquet",  # hive partitions are not credentials
    "/data/flights.csv",
    "postgresql://u:${PGPW}@h/db?password=${PGPW}",  # placeholders are not secrets
    "Expected 2 fields in line 3, saw 3",
])
def test_text_without_secrets_is_unchanged(text: str):
    assert mask_url(text) == text == mask_text(text)


def test_unset_variable_names_it_and_hides_the_literal_password(monkeypatch):
    monkeypatch.delenv("FLYWHEEL_TEST_DB", raising=False)
    with pytest.raises(ContractError, match=r"unset environment variable \$\{FLYWHEEL_TEST_DB\}") as info:
        expand("postgresql://u:hunter2@h/${FLYWHEEL_TEST_DB}")
    assert "hunter2" not in str(info.value)
    monkeypatch.setenv("FLYWHEEL_TEST_DB", "sales")
    assert expand("postgresql://u:hunter2@h/${FLYWHEEL_TEST_DB}") == "postgresql://u:hunter2@h/sales"
    assert expand("https://h/odata?$filter=x") == "https://h/odata?$filter=x"  # bare $ stays
    with pytest.raises(ContractError, match="malformed"):
        expand("https://h/${FLYWHEEL_TEST_DB")


def test_a_header_given_twice_is_a_contract_error():
    with pytest.raises(ValidationError, match="both headers and headers_from_env"):
        HttpSource(kind="http", url="https://h/x", headers={"Authorization": "Bearer ${T}"},
                   headers_from_env={"authorization": "T"})


# --- HTTP ---------------------------------------------------------------------------------

class SecretApi(JsonHandler):
    """Two pages of records for the right api_key, client_secret and bearer token.

    ``mode`` "ok" serves pages, "500" always fails, "401" rejects every request.
    """

    mode = "ok"
    calls: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server naming
        SecretApi.calls.append(self.path)
        query = {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}
        if SecretApi.mode == "500":
            return self._send(500, {"error": "down"})
        if (SecretApi.mode == "401" or self.headers.get("Authorization") != f"Bearer {TOKEN}"
                or query.get("api_key") != API_KEY or query.get("client_secret") != CLIENT_SECRET
                or query.get("region") != "eu-west"):
            return self._send(401, {"error": "unauthorized"})
        page = int(query["page"])
        rows = FRAME.to_dict("records")
        self._send(200, {"data": [rows[:2], rows[2:], []][min(page, 3) - 1]})



@pytest.fixture
def secret_api(monkeypatch) -> Iterator[str]:
    monkeypatch.setenv("FLYWHEEL_TEST_API_KEY", API_KEY)
    monkeypatch.setenv("FLYWHEEL_TEST_TOKEN", TOKEN)
    monkeypatch.setenv("FLYWHEEL_TEST_CLIENT_SECRET", CLIENT_SECRET)
    monkeypatch.setenv("FLYWHEEL_TEST_REGION", "eu-west")
    server = ThreadingHTTPServer(("127.0.0.1", 0), SecretApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    SecretApi.mode, SecretApi.calls = "ok", []
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture
def debug_logs(caplog) -> Iterator[pytest.LogCaptureFixture]:
    """Every logger at DEBUG, urllib3 included (as a fresh process would have it)."""
    urllib3 = logging.getLogger("urllib3")
    level = urllib3.level
    urllib3.setLevel(logging.NOTSET)
    caplog.set_level(logging.DEBUG)
    yield caplog
    urllib3.setLevel(level)


def secret_source(base: str, **kw) -> HttpBatchSource:
    spec = HttpSource(
        kind="http", url=base + "/v1/items?api_key=${FLYWHEEL_TEST_API_KEY}",
        headers={"Authorization": "Bearer ${FLYWHEEL_TEST_TOKEN}"},
        params={"client_secret": "${FLYWHEEL_TEST_CLIENT_SECRET}", "region": "${FLYWHEEL_TEST_REGION}"},
        page_param="page", backoff_s=0.01, **kw)
    return HttpBatchSource("items", spec)


def assert_no_secret(text: str) -> None:
    for secret in (API_KEY, TOKEN, CLIENT_SECRET):
        assert secret not in text


def test_http_variables_reach_the_server_and_never_the_logs(secret_api: str, debug_logs):
    source = secret_source(secret_api)
    pd.testing.assert_frame_equal(source.read(), FRAME)
    assert len(SecretApi.calls) == 3  # two pages, then an empty one
    assert all(API_KEY in call and CLIENT_SECRET in call for call in SecretApi.calls)
    described = source.describe()
    assert described == (f"http {secret_api}/v1/items?api_key=***&client_secret=***&region=eu-west")
    assert_no_secret(debug_logs.text)


def test_http_5xx_errors_and_retry_warnings_mask_secrets(secret_api: str, debug_logs):
    SecretApi.mode = "500"
    with pytest.raises(TransientSourceError, match="failed after 3 attempts") as info:
        secret_source(secret_api, retries=2).read()
    message = str(info.value)
    assert f"{secret_api}/v1/items?api_key=***" in message
    assert_no_secret(message)
    assert "retrying" in debug_logs.text and secret_api in debug_logs.text
    assert_no_secret(debug_logs.text)


def test_http_401_fails_at_once_as_an_authentication_error(secret_api: str, debug_logs):
    SecretApi.mode = "401"
    with pytest.raises(SourceError, match=r"authentication failed \(HTTP 401\)") as info:
        secret_source(secret_api).read()
    assert not isinstance(info.value, TransientSourceError)
    assert len(SecretApi.calls) == 1
    assert f"{secret_api}/v1/items" in str(info.value)
    assert_no_secret(str(info.value) + debug_logs.text)


def test_http_unset_variable_is_a_contract_error_naming_it(secret_api: str, monkeypatch):
    monkeypatch.delenv("FLYWHEEL_TEST_TOKEN")
    with pytest.raises(ContractError, match=r"table 'items': .*\$\{FLYWHEEL_TEST_TOKEN\}") as info:
        secret_source(secret_api).read()
    assert_no_secret(str(info.value))
    assert SecretApi.calls == []


# --- files --------------------------------------------------------------------------------

class SignedFiles(BaseHTTPRequestHandler):
    """A CSV behind a signed URL (?sig=) and a bearer header: a presigned-object-store stand-in."""

    def do_GET(self):  # noqa: N802
        query = parse_qs(urlsplit(self.path).query)
        if query.get("sig") != [API_KEY] or self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(403)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        payload = FRAME.to_csv(index=False).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/csv")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_HEAD = do_GET

    def log_message(self, *args):
        pass


def test_file_over_http_expands_path_and_storage_options_and_masks_errors(monkeypatch, debug_logs):
    server = ThreadingHTTPServer(("127.0.0.1", 0), SignedFiles)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setenv("FLYWHEEL_TEST_SIG", API_KEY)
    monkeypatch.setenv("FLYWHEEL_TEST_TOKEN", TOKEN)
    # pandas sends an http(s) URL's storage_options as request headers.
    spec = FileSource(kind="file", path=base + "/t.csv?sig=${FLYWHEEL_TEST_SIG}", format="csv",
                      storage_options={"Authorization": "Bearer ${FLYWHEEL_TEST_TOKEN}"})
    try:
        source = FileBatchSource("t", spec)
        pd.testing.assert_frame_equal(source.read(), FRAME)
        assert source.describe() == f"file {base}/t.csv?sig=***"

        monkeypatch.setenv("FLYWHEEL_TEST_SIG", "wrong-" + API_KEY)
        with pytest.raises(SourceError) as info:
            FileBatchSource("t", spec).read()
    finally:
        server.shutdown()
    message = str(info.value)
    assert f"table 't' from {base}/t.csv?sig=***" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert_no_secret(message + debug_logs.text)


def test_storage_options_are_expanded_at_any_depth(monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_SECRET", CLIENT_SECRET)
    options = {"key": "AKIA", "secret": "${FLYWHEEL_TEST_SECRET}", "anon": False,
               "client_kwargs": {"endpoint_url": "http://${FLYWHEEL_TEST_SECRET}:9000"},
               "tags": ["${FLYWHEEL_TEST_SECRET}"]}
    assert expand_values(options) == {
        "key": "AKIA", "secret": CLIENT_SECRET, "anon": False,
        "client_kwargs": {"endpoint_url": f"http://{CLIENT_SECRET}:9000"}, "tags": [CLIENT_SECRET]}


def test_missing_file_error_shows_the_resolved_path(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("FLYWHEEL_TEST_DIR", str(tmp_path / "in"))
    source = FileBatchSource("t", FileSource(kind="file", path="${FLYWHEEL_TEST_DIR}/absent.csv"))
    assert source.describe() == f"file {tmp_path / 'in' / 'absent.csv'}"
    with pytest.raises(SourceError) as info:
        source.read()
    assert str(info.value) == (f"cannot read table 't' from {tmp_path / 'in' / 'absent.csv'}: "
                               f"no such file ({tmp_path / 'in' / 'absent.csv'})")


@pytest.mark.parametrize("padding", [0, 600_000])  # the second lies beyond pandas' read buffer
def test_latin1_csv_says_which_byte_is_not_utf8_and_how_to_fix_it(tmp_path: Path, padding: int):
    head = "id,name\n" + "".join(f"{i},{'x' * 50}\n" for i in range(padding // 53))
    prefix = (head + "1,ok\n2,caf").encode()
    path = tmp_path / "latin1.csv"
    path.write_bytes(prefix + "\u00e9\n".encode("latin-1"))
    line = prefix.count(b"\n") + 1
    with pytest.raises(SourceError) as info:
        FileBatchSource("t", FileSource(kind="file", path=str(path))).read()
    message = str(info.value)
    assert message.startswith(f"cannot read table 't' from {path}: the file is not valid UTF-8 text")
    assert f"byte 0xe9 at byte offset {len(prefix):,} (line {line:,})" in message
    assert "read_options: {encoding: latin-1}" in message
    assert "truncated" not in message
    fixed = FileBatchSource("t", FileSource(kind="file", path=str(path),
                                            read_options={"encoding": "latin-1"})).read()
    assert fixed["name"].iloc[-1] == "caf\u00e9"


# --- SQL ----------------------------------------------------------------------------------

@pytest.fixture
def things(postgres_server, monkeypatch):
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_server.url())
    FRAME.to_sql("secret_things", engine, index=False, if_exists="replace")
    engine.dispose()
    monkeypatch.setenv("FLYWHEEL_TEST_PGPW", postgres_server.password)
    return postgres_server


def sql_source(url: str) -> SqlBatchSource:
    return SqlBatchSource("things", SqlSource(kind="sql", url=url,
                                              query="select * from secret_things order by id"))


def pg_urls(server) -> dict[str, str]:
    """The password in user info, and as a ?password= query parameter."""
    at = f"{server.host}:{server.port}/{server.database}"
    return {"userinfo": f"postgresql+psycopg://{server.user}:${{FLYWHEEL_TEST_PGPW}}@{at}",
            "query": f"postgresql+psycopg://{server.user}@{at}?password=${{FLYWHEEL_TEST_PGPW}}"}


@pytest.mark.integration
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_sql_password_from_env_reads_and_is_masked(things, form: str, caplog):
    caplog.set_level(logging.DEBUG)
    source = sql_source(pg_urls(things)[form])
    pd.testing.assert_frame_equal(source.read(), FRAME)
    described = source.describe()
    assert things.password not in described
    assert f"{things.host}:{things.port}/{things.database}" in described and "***" in described
    assert things.password not in caplog.text


@pytest.mark.integration
@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_sql_wrong_password_is_an_authentication_error_not_retried(things, form: str, monkeypatch):
    wrong = "wrong-pw-4b2e9c"
    monkeypatch.setenv("FLYWHEEL_TEST_PGPW", wrong)
    with pytest.raises(SourceError) as info:
        sql_source(pg_urls(things)[form]).read()
    message = str(info.value)
    assert not isinstance(info.value, TransientSourceError)
    assert "authentication failed for postgresql+psycopg://flywheel" in message
    assert f"{things.host}:{things.port}/{things.database}" in message and "***" in message
    assert wrong not in message and things.password not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__
