"""The BentoML service end to end: a dataset with a lookup join, trained twice (champion and
challenger), served by ``python -m flows.deploy serve`` as a real ``bentoml serve`` process."""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import requests

from tests.conftest import free_port, write_contract

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow

CONTRACT = """\
    name: routes
    base_table: events
    tables:
      events:
        source: {kind: file, path: "${ROUTES_CSV}"}
        primary_key: [row_id]
        columns:
          row_id: {type: int}
          at: {type: datetime, timezone: UTC}
          a: {type: str, allowed: [x, y]}
          b_id: {type: int, min: 1}
          noise: {type: float}
          outcome: {type: float, min: 0, max: 1}
          minute: {type: int, min: 0, max: 59}
      kinds:
        source: {kind: file, path: "${KINDS_CSV}"}
        primary_key: [b_id]
        columns:
          b_id: {type: int}
          kind: {type: str}
    joins:
      - {table: kinds, join_on: [b_id], columns: [kind]}
    target: {column: outcome, kind: binary, threshold: 0.5, name: positive}
    features: {categorical: [a, kind], numeric: [noise]}
    time_column: at
    split: {train_fraction: 0.6, validation_fraction: 0.2}
    """


def kind_of(b_id: int) -> str:
    return "u" if b_id % 2 else "v"


@dataclass
class Service:
    url: str
    home: Path
    lake: str
    model_name: str
    token: str


@pytest.fixture(scope="module")
def service(tmp_path_factory, prefect_harness):
    """The 'routes' dataset: the label is XOR(a == x, kind == u), and kind comes from a lookup
    table keyed by b_id (b_id 20 has no row there). Only a correct join predicts it."""
    from core.settings import configure
    from flows.deploy import DeployParams, deploy
    from flows.train import TrainParams, train
    from serving.control import read_state

    root = tmp_path_factory.mktemp("serving")
    rng = np.random.default_rng(0)
    n = 2400
    a = rng.choice(["x", "y"], n)
    b_id = rng.integers(1, 21, n)
    kind = np.array([kind_of(b) for b in b_id])
    label = ((a == "x") ^ (kind == "u")).astype(float)
    flip = rng.random(n) < 0.03
    label[flip] = 1 - label[flip]
    pd.DataFrame({"row_id": np.arange(1, n + 1), "at": pd.date_range("2024-01-01", periods=n, freq="h"),
                  "a": a, "b_id": b_id, "noise": rng.normal(size=n), "outcome": label,
                  "minute": np.arange(n) % 60}).to_csv(root / "routes.csv", index=False)  # minute: read by nothing
    pd.DataFrame({"b_id": range(1, 20), "kind": [kind_of(b) for b in range(1, 20)]}).to_csv(
        root / "kinds.csv", index=False)
    write_contract(root / "datasets", "routes", CONTRACT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("ROUTES_CSV", str(root / "routes.csv"))
        patch.setenv("KINDS_CSV", str(root / "kinds.csv"))
        patch.delenv("FLYWHEEL_SERVING_ADMIN_TOKEN", raising=False)
        # One worker: these tests read one process's status; test_two_workers_... serves two.
        patch.setenv("FLYWHEEL_SERVING__WORKERS", "1")
        budget = {"trials": 1, "max_epochs": 3, "grace_period": 1, "num_workers": 1,
                  "search_space": {"lr": [0.02, 0.03], "width": [16], "depth": [1], "dropout": [0.0],
                                   "embedding_dim": [4], "batch_size": [64], "weight_decay": [1e-6, 1e-5]}}
        where = {"home": str(root / "home"), "datasets_dir": str(root / "datasets")}
        # Champion and challenger of different families: the network, then gradient-boosted
        # trees. Every test below (routing, skew, promote and rollback under load, monitor,
        # A/B) then serves both families side by side.
        configure(**where, train={**budget, "families": ["tabular_net"]})
        first = train(TrainParams(dataset="routes"))
        settings = configure(**where, train={**budget, "families": ["gbdt"]})
        second = train(TrainParams(dataset="routes"))
        assert (first.registered_version, second.registered_version) == ("1", "2"), (first, second)
        assert (first.family, second.family) == ("tabular_net", "gbdt")
        port = free_port()
        result = deploy(DeployParams(action="serve", dataset="routes", port=port, challenger_share=0.5,
                                     shadow=True))
        assert result.running and result.url == f"http://127.0.0.1:{port}"
        state = read_state(settings, "flywheel-routes")
        assert state is not None and state.token
        yield Service(result.url, settings.home, settings.lake, "flywheel-routes", state.token)
        deploy(DeployParams(action="stop", dataset="routes"))
        configure()


def predict(service: Service, records: list[dict], routing_key: str | None = None, timeout: float = 30) -> dict:
    body: dict = {"records": records}
    if routing_key is not None:
        body["routing_key"] = routing_key
    response = requests.post(f"{service.url}/predict", json=body, timeout=timeout)
    assert response.status_code == 200, response.text
    return response.json()


def admin_get(service: Service, path: str) -> dict:
    response = requests.get(f"{service.url}/admin{path}", headers={"Authorization": f"Bearer {service.token}"},
                            timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def record(a: str, b_id: int, **extra) -> dict:
    return {"at": "2024-05-01T10:00:00Z", "a": a, "b_id": b_id, "noise": 0.0, **extra}


def test_predictions_use_the_lookup_route_stickily_and_name_their_model(service):
    # The lookup decides the label: a=x with kind u (b_id odd) is negative, with kind v positive.
    out = predict(service, [record("x", 1), record("x", 2), record("y", 1), record("y", 2)], routing_key="k1")
    scores = [p["score"] for p in out["predictions"]]
    assert scores[0] < 0.3 and scores[1] > 0.7 and scores[2] > 0.7 and scores[3] < 0.3, scores
    # The decision is at each model's own threshold (chosen on validation, recorded at registration).
    models = admin_get(service, "/models")
    assert (models["champion"]["family"], models["challenger"]["family"]) == ("tabular_net", "gbdt")
    thresholds = {m["version"]: m["metrics"]["threshold"] for m in (models["champion"], models["challenger"])}
    assert all(p["decision"] == (p["score"] >= thresholds[p["model_version"]]) for p in out["predictions"])
    assert len({p["request_id"] for p in out["predictions"]}) == 4
    first = out["predictions"][0]
    assert first["model_name"] == service.model_name and first["model_version"] in ("1", "2")
    assert first["variant"] == {"1": "champion", "2": "challenger"}[first["model_version"]]
    # A key with no lookup row: the 'unknown' encoding, and the response says so. A record that
    # sends the joined column itself uses it (it wins over the lookup).
    missing = predict(service, [record("x", 20), record("x", 20, kind="v"), record("x", 1, kind="v")])
    assert [p["missing_lookups"] for p in missing["predictions"]] == [["kinds"], [], []]
    assert missing["predictions"][1]["score"] > 0.7 and missing["predictions"][2]["score"] > 0.7
    # Sticky: a key always gets the same variant; about half the keys get the challenger.
    variants = {}
    for i in range(120):
        got = {p["variant"] for p in predict(service, [record("x", 1)], routing_key=f"client-{i}")["predictions"]}
        assert len(got) == 1
        variants[i] = got.pop()
    again = {i: predict(service, [record("y", 2)], routing_key=f"client-{i}")["predictions"][0]["variant"]
             for i in range(0, 120, 7)}
    assert all(variants[i] == v for i, v in again.items())
    share = Counter(variants.values())["challenger"] / len(variants)
    assert 0.3 < share < 0.7, share


def test_served_scores_equal_the_scores_of_the_feature_table_the_model_was_trained_on(service):
    """No training/serving skew: raw rows sent to the service score as their ETL-built feature
    rows do offline (the same joins, derivations, vocabularies and scaling)."""
    from core.contract import load_contract
    from core.lake import Lake
    from core.registry import Registry, load_version
    from core.settings import get_settings

    lake = Lake(service.lake)
    raw = lake.read_pandas(lake.uri("raw", "routes", "events"), columns=["row_id", "at", "a", "b_id", "noise"])
    sample = raw.sample(200, random_state=1).sort_values("row_id")
    records = [{"row_id": int(r.row_id), "at": r.at.isoformat(), "a": r.a, "b_id": int(r.b_id), "noise": float(r.noise)}
               for r in sample.itertuples()]
    served = predict(service, records, routing_key="skew-check")["predictions"]
    version = {p["model_version"] for p in served}
    assert len(version) == 1
    registry = Registry.for_uri(get_settings().tracking_uri)
    model = load_version(registry, service.model_name,
                         registry.client.get_model_version(service.model_name, version.pop()))
    contract = load_contract("routes")
    features = lake.read_pandas(lake.uri("features", "routes"))
    features = features.set_index(features["at"].dt.tz_convert("UTC")).loc[pd.to_datetime(sample["at"], utc=True)]
    offline = model.model.predict(features[contract.features.categorical].to_numpy(np.int64),
                                  features[contract.features.numeric].to_numpy(np.float32))
    np.testing.assert_allclose([p["score"] for p in served], offline, rtol=1e-5, atol=1e-6)


def test_feedback_is_recorded_for_known_request_ids_and_unknown_ones_are_reported(service):
    out = predict(service, [record("x", 3), record("y", 4)])
    ids = [p["request_id"] for p in out["predictions"]]
    response = requests.post(f"{service.url}/feedback", timeout=30, json={"items": [
        {"request_id": ids[0], "actual": 0.0}, {"request_id": ids[1], "actual": 1.0},
        {"request_id": "no-such-request", "actual": 1.0}]})
    assert response.status_code == 200, response.text
    assert response.json() == {"accepted": 2, "unknown_request_ids": ["no-such-request"]}


def test_a_real_challenger_is_judged_only_once_each_arm_has_min_rows_labels(service):
    """Found: one labelled prediction of a healthy challenger had no spread and got it dropped as
    "constant". With 1 and 10 labels nothing is decided; with min_rows it is compared."""
    from core.ab import labelled_arms
    from core.contract import load_contract
    from core.lake import Lake
    from core.settings import get_settings
    from flows.evaluate import EvaluateParams, evaluate

    settings = get_settings()
    contract = load_contract("routes")
    lake = Lake(settings.lake)
    rng = np.random.default_rng(5)
    sent: dict[str, list[tuple[dict, dict]]] = {"1": [], "2": []}
    for i in range(24):
        batch = [record(str(rng.choice(["x", "y"])), int(rng.integers(1, 20)), noise=round(float(rng.normal()), 6))
                 for _ in range(40)]
        for p, item in zip(predict(service, batch, routing_key=f"ab-{i}")["predictions"], batch, strict=True):
            sent[p["model_version"]].append((p, item))
    assert len(sent["1"]) >= 120 and len(sent["2"]) >= 120, {k: len(v) for k, v in sent.items()}

    def label(pairs: list[tuple[dict, dict]]) -> None:
        if not pairs:
            return
        items = [{"request_id": p["request_id"], "actual": float((item["a"] == "x") != (kind_of(item["b_id"]) == "u"))}
                 for p, item in pairs]
        response = requests.post(f"{service.url}/feedback", json={"items": items}, timeout=30)
        assert response.json().get("accepted") == len(items), response.text
        wait_for_log(service)

    label(sent["1"])  # the champion's arm has plenty
    before = labelled_arms(lake, contract, overlap_with="2")
    labelled = before["2"].rows if "2" in before else 0  # earlier tests in this module may have labelled a few
    assert labelled < 10, f"earlier tests labelled {labelled} of the challenger's predictions; this test needs < 10"
    ours = 0
    looks: list[int] = []
    for target in (max(1, labelled), 10, 120):
        need = target - labelled
        label(sent["2"][ours:ours + need])
        ours += max(need, 0)
        labelled = max(labelled, target)
        result = evaluate(EvaluateParams(dataset="routes", min_rows=100, act=False))
        assert result.decision["challenger"]["rows"] >= target and "constant" not in result.reason, result.reason
        if target < 100:
            assert result.action == "keep" and "not enough ground truth" in result.reason, (target, result.reason)
        else:  # a real comparison of a model that ranks: its metric and an interval
            assert result.decision["challenger"]["value"] is not None and result.decision["interval"], result.reason
            assert not result.decision["challenger"]["constant"]
        assert result.decision["test"] == "sequential"
        looks.append(result.decision["looks"])
    assert not result.acted
    assert looks == [looks[0], looks[0] + 1, looks[0] + 2], looks  # each look at the pair is counted


def test_thompson_allocation_sets_the_challengers_share_and_the_service_routes_by_it(service, monkeypatch):
    """serving.allocation: thompson: the evaluate flow sets the challenger's share from both
    arms' rewards on ground truth (the labelled rows of the test above), within the floor and
    ceiling; the service routes by it within the poll."""
    from core.allocation import ALLOCATION_TAG, Allocation
    from core.registry import Registry
    from core.settings import get_settings
    from flows.evaluate import EvaluateParams, evaluate

    monkeypatch.setenv("FLYWHEEL_SERVING__ALLOCATION", "thompson")
    get_settings.cache_clear()
    registry = Registry.for_uri(get_settings().tracking_uri)
    try:
        result = evaluate(EvaluateParams(dataset="routes", min_rows=100, act=False))
        allocation = Allocation.from_tag(registry.tags(service.model_name).get(ALLOCATION_TAG))
        assert allocation is not None and allocation.source == "thompson" and allocation.challenger_version == "2"
        assert result.allocation == allocation.share and 0.05 <= allocation.share <= 0.95, allocation
        assert "P(challenger better)" in allocation.reason and "/" in allocation.reason
        deadline = time.monotonic() + 10
        while (status := admin_get(service, "/models"))["allocation"] != "thompson" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert status["allocation"] == "thompson" and status["challenger_share"] == allocation.share, status
    finally:
        registry.client.delete_registered_model_tag(service.model_name, ALLOCATION_TAG)
        monkeypatch.delenv("FLYWHEEL_SERVING__ALLOCATION")
        get_settings.cache_clear()


def test_admin_routes_need_the_token(service):
    assert requests.get(f"{service.url}/admin/models", timeout=10).status_code == 401
    wrong = requests.get(f"{service.url}/admin/models", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert wrong.status_code == 401
    good = requests.get(f"{service.url}/admin/models", headers={"Authorization": f"Bearer {service.token}"},
                        timeout=10)
    assert good.status_code == 200
    body = good.json()
    assert body["champion"]["version"] == "1" and body["challenger"]["version"] == "2"
    assert body["lookups"] == {"kinds": 1} and body["ready"] is True
    assert requests.post(f"{service.url}/admin/reload", timeout=10).status_code == 401


def test_status_serve_again_and_what_listens(service):
    """status reports what serves; serve with the same settings reloads the same process; the
    service listens on loopback only; its admin token is in no log."""
    from core.settings import get_settings
    from flows.deploy import DeployParams, deploy
    from serving.control import read_state

    status = deploy(DeployParams(action="status", dataset="routes"))
    assert status.running and status.serving["champion"]["version"] == "1"
    assert status.serving["challenger"]["version"] == "2" and status.serving["shadow"] is True
    pid = read_state(get_settings(), service.model_name).pid
    again = deploy(DeployParams(action="serve", dataset="routes", port=int(service.url.rsplit(":", 1)[1]),
                                challenger_share=0.5, shadow=True))
    assert again.running and read_state(get_settings(), service.model_name).pid == pid
    port = int(service.url.rsplit(":", 1)[1])
    listening = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                listening.add(local.rsplit(":", 1)[0])
    assert listening == {"0100007F"}, listening  # 127.0.0.1 only
    log_text = (service.home / "serving" / f"{service.model_name}.log").read_text()
    assert service.token not in log_text
    assert service.token not in status.model_dump_json() and service.token not in repr(read_state(
        get_settings(), service.model_name))


def test_bad_input_gets_a_4xx_that_names_the_problem_never_a_5xx(service):
    good = record("x", 1)
    cases = {
        "missing field": ({"records": [{k: v for k, v in good.items() if k != "a"}]}, "a"),
        "extra field": ({"records": [{**good, "surprise": 1}]}, "surprise"),
        "wrong type": ({"records": [{**good, "b_id": "seven"}]}, "b_id"),
        "not allowed target": ({"records": [{**good, "outcome": 1.0}]}, "outcome"),
        "empty list": ({"records": []}, "records"),
        "no records": ({}, "records"),
        "bad time": ({"records": [{**good, "at": "soon"}]}, "at"),
        "too many": ({"records": [good] * 1001}, "records"),
    }
    for name, (body, field) in cases.items():
        response = requests.post(f"{service.url}/predict", json=body, timeout=30)
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
        assert field in response.text, (name, response.text[:300])
    raw = {
        "NaN": b'{"records": [{"at": "2024-05-01T10:00:00Z", "a": "x", "b_id": 1, "noise": NaN}]}',
        "Infinity": b'{"records": [{"at": "2024-05-01T10:00:00Z", "a": "x", "b_id": 1, "noise": Infinity}]}',
        "invalid JSON": b'{"records": [',
        "not an object": b"[1, 2, 3]",
    }
    for name, body in raw.items():
        response = requests.post(f"{service.url}/predict", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert 400 <= response.status_code < 500, (name, response.status_code, response.text[:300])
    big = b'{"records": [' + b" " * (2 << 20) + b"]}"
    response = requests.post(f"{service.url}/predict", data=big, timeout=30,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 413, response.text[:300]
    # A bad record never reaches a batch: good requests sent at the same time all succeed.
    with_bad = [({"records": [{**good, "b_id": "x"}]}, 400), ({"records": [good]}, 200)] * 20
    results: list[int] = []

    def send(body: dict) -> None:
        results.append(requests.post(f"{service.url}/predict", json=body, timeout=30).status_code)

    threads = [threading.Thread(target=send, args=(body,)) for body, _ in with_bad]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) == sorted(code for _, code in with_bad)


def test_a_source_row_scores_as_the_minimal_record_and_a_misspelt_name_is_told_the_closest(service):
    """A record as the source table has it (every column but the target: row_id and minute are
    read by no feature) gets a 200 naming them, with the score of the record cut to what the
    model reads; a misspelt name gets a 400 with the closest known one; /docs.json shows both."""
    source = json.loads(pd.read_csv(service.home.parent / "routes.csv", nrows=1).drop(columns="outcome")
                        .to_json(orient="records"))[0]  # its time as the file has it: 2024-01-01 00:00:00
    assert set(source) == {"row_id", "at", "a", "b_id", "noise", "minute"}
    minimal = {k: v for k, v in source.items() if k not in ("row_id", "minute")}
    out = predict(service, [minimal, source], routing_key="a-source-row")["predictions"]
    assert [p["ignored_fields"] for p in out] == [[], ["minute", "row_id"]]
    assert out[0]["variant"] == out[1]["variant"] and out[1]["score"] == pytest.approx(out[0]["score"], rel=1e-6)
    response = requests.post(f"{service.url}/predict", json={"records": [{**minimal, "noize": 0.0, "outcome": 1.0}]},
                             timeout=30)
    assert response.status_code == 400, response.text
    detail = {d["loc"][-1]: d for d in response.json()["detail"]}
    assert detail["noize"] == {"loc": ["records", 0, "noize"], "type": "extra_forbidden",
                               "msg": "unknown field 'noize': did you mean 'noise'?"}
    assert detail["outcome"]["type"] == "target_forbidden" and "/feedback" in detail["outcome"]["msg"]
    schemas = requests.get(f"{service.url}/docs.json", timeout=30).json()["components"]["schemas"]
    record_schema = schemas["RoutesRecord"]
    assert record_schema["additionalProperties"] is False and "outcome" not in record_schema["properties"]
    assert {"row_id", "minute"} <= set(record_schema["properties"]) - set(record_schema["required"])
    assert "ignored_fields" in schemas["Prediction"]["required"]


def test_hypothesis_records_get_an_answer_or_a_4xx(service):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                       st.text(max_size=20), st.lists(st.integers(), max_size=3))
    records = st.fixed_dictionaries({}, optional={"at": st.one_of(values, st.just("2024-05-01T10:00:00Z")),
                                                  "a": st.one_of(values, st.sampled_from(["x", "y"])),
                                                  "b_id": st.one_of(values, st.integers(1, 30)),
                                                  "noise": values, "kind": values, "row_id": values,
                                                  "other": values})

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(records, min_size=0, max_size=4))
    def check(batch):
        body = json.dumps({"records": batch}, allow_nan=True)
        response = requests.post(f"{service.url}/predict", data=body, timeout=30,
                                 headers={"Content-Type": "application/json"})
        assert response.status_code < 500, (batch, response.status_code, response.text[:300])

    check()


def steady_load(service: Service, stop: threading.Event, seen: list[tuple[float, str, str]],
                failures: list[str], routing_key: str | None = "steady") -> None:
    """One client posting one record with ``routing_key`` (None: a new key each time) until
    ``stop``: (time, model version, request id) of each answer in ``seen``, anything else in
    ``failures``."""
    import uuid

    session = requests.Session()
    i = 0
    while not stop.is_set():
        i += 1
        try:
            response = session.post(f"{service.url}/predict", timeout=30,
                                    json={"records": [record("x", 1 + i % 19)],
                                          "routing_key": routing_key or uuid.uuid4().hex})
            if response.status_code != 200:
                failures.append(f"{response.status_code}: {response.text[:200]}")
                continue
            prediction = response.json()["predictions"][0]
            seen.append((time.monotonic(), prediction["model_version"], prediction["request_id"]))
        except requests.RequestException as exc:
            failures.append(repr(exc))
        time.sleep(0.005)


def test_promote_and_rollback_under_load_fail_no_request(service):
    from flows.deploy import DeployParams, deploy

    stop = threading.Event()
    seen: list[tuple[float, str, str]] = []
    failures: list[str] = []
    workers = [threading.Thread(target=steady_load, args=(service, stop, seen, failures)) for _ in range(4)]
    for worker in workers:
        worker.start()
    try:
        time.sleep(2)
        before = {v for _, v, _ in seen}
        promoted = deploy(DeployParams(action="promote", dataset="routes"))
        assert promoted.moved["from_version"] == "1" and promoted.moved["to_version"] == "2"
        mark = time.monotonic()
        time.sleep(2)
        after_promote = {v for t, v, _ in seen if t > mark + 0.5}
        rolled = deploy(DeployParams(action="rollback", dataset="routes"))
        assert rolled.moved["to_version"] == "1"
        mark = time.monotonic()
        time.sleep(2)
    finally:
        stop.set()
        for worker in workers:
            worker.join()
    after_rollback = {v for t, v, _ in seen if t > mark + 0.5}
    assert not failures, failures[:5]
    assert len(seen) > 100
    # The 'steady' key: champion v1 before; after the promotion the champion is v2 (the
    # challenger is the same version, so it is not loaded twice); after the rollback v1 again.
    assert before == {"1"} or before == {"2"}, before  # one variant for one key
    assert after_promote == {"2"}, after_promote
    assert after_rollback == {"1"} or after_rollback == before, after_rollback


def test_an_alias_moved_in_the_registry_alone_is_served_within_the_poll(service):
    """A promotion made outside the deploy flow (the MLflow UI, another machine), with no
    reload asked: the service follows the registry by itself within serving.alias_poll_s (2 s)
    plus the model's load."""
    from core.registry import CHAMPION, Registry

    registry = Registry.for_uri(f"sqlite:///{service.home / 'mlflow.db'}", actor="someone in the MLflow UI")
    before = admin_get(service, "/models")["champion"]["version"]
    other = "2" if str(before) == "1" else "1"
    moved_at = time.monotonic()
    registry.move_alias(service.model_name, CHAMPION, other, "promoted by hand")
    try:
        served = None
        while time.monotonic() < moved_at + 30 and served != other:
            time.sleep(0.1)
            served = str(admin_get(service, "/models")["champion"]["version"])
        took = time.monotonic() - moved_at
        assert served == other, f"still serving {served} after {took:.1f} s"
        assert took < 2.0 + 8.0, took
        scored = predict(service, [record("x", 1)], routing_key="steady")["predictions"][0]
        assert scored["model_version"] == other or admin_get(service, "/models")["challenger"] is not None
    finally:
        registry.move_alias(service.model_name, CHAMPION, str(before), "back")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and str(admin_get(service, "/models")["champion"]["version"]) != str(before):
            time.sleep(0.1)


def test_metrics_name_variants_and_versions(service):
    text = requests.get(f"{service.url}/metrics", timeout=10).text
    for name in ("flywheel_predictions_total", "flywheel_prediction_latency_seconds_bucket",
                 "flywheel_batch_size_bucket", "flywheel_feedback_total", "flywheel_errors_total",
                 "flywheel_model_info", "bentoml_service_request_total"):
        assert name in text, name
    assert 'variant="champion"' in text and 'model_version="1"' in text


def test_requests_succeed_while_the_log_cannot_be_written_and_the_rows_follow(service):
    """The prediction log's table is replaced by a file (every commit fails), then restored."""
    import shutil

    from core.lake import Lake

    lake = Lake(service.lake)
    uri = Path(lake.uri("serving", "routes", "predictions"))
    predict(service, [record("x", 1)])  # the log table exists once a prediction was written
    deadline = time.time() + 30
    while not uri.exists() and time.time() < deadline:
        time.sleep(0.2)
    aside = uri.with_name("predictions-aside")
    shutil.move(uri, aside)
    uri.write_text("the disk is gone")
    try:
        ids = [p["request_id"] for i in range(20)
               for p in predict(service, [record("x", 1 + i % 19)])["predictions"]]
        deadline = time.time() + 30
        while time.time() < deadline and admin_get(service, "/models")["log_failures"] == 0:
            time.sleep(0.2)
        status = admin_get(service, "/models")
        assert status["log_failures"] >= 1 and status["log_backlog"] >= 20, status
        metrics = requests.get(f"{service.url}/metrics", timeout=10).text
        assert 'flywheel_log_write_failures_total{table="predictions"}' in metrics
        backlog = next(line for line in metrics.splitlines() if line.startswith("flywheel_log_backlog_rows"))
        assert float(backlog.rsplit(" ", 1)[1]) >= 20, backlog
        log_file = next((service.home / "serving").glob("flywheel-routes.log"))
        assert "prediction log: writing" in log_file.read_text()
    finally:
        uri.unlink()
        shutil.move(aside, uri)
    deadline = time.time() + 60  # the writer backs off (up to 30 s) between retries
    while time.time() < deadline and admin_get(service, "/models")["log_backlog"] > 0:
        time.sleep(0.5)
    assert admin_get(service, "/models")["log_backlog"] == 0
    logged = lake.read_pandas(str(uri), columns=["request_id", "served"]).query("served")["request_id"]
    assert logged[logged.isin(ids)].value_counts().to_dict() == dict.fromkeys(ids, 1)  # each once


def test_a_new_lookup_version_is_picked_up_on_reload(service):
    """The kinds table gains b_id 20 (kind v): after a reload the lookup is found."""
    from core.lake import Lake

    lake = Lake(service.lake)
    uri = lake.uri("raw", "routes", "kinds")
    assert predict(service, [record("x", 20)])["predictions"][0]["missing_lookups"] == ["kinds"]
    import pyarrow as pa

    from core.lake import read_arrow

    current = read_arrow(lake.table(uri))
    row = {**current.slice(current.num_rows - 1).to_pylist()[0], "b_id": 20, "kind": "v"}
    lake.append(uri, pa.Table.from_pylist([row], schema=current.schema), {"flywheel.writer": "test"})
    response = requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {service.token}"},
                             timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["lookups"]["kinds"] == lake.latest_version(uri)
    out = predict(service, [record("x", 20)])["predictions"][0]
    assert out["missing_lookups"] == [] and out["score"] > 0.7  # x with kind v: positive


def wait_for_log(service: Service) -> None:
    deadline = time.time() + 60
    while time.time() < deadline and admin_get(service, "/models")["log_backlog"] > 0:
        time.sleep(0.3)


def test_the_monitor_finds_drift_and_degraded_performance_in_live_traffic(service, monkeypatch):
    """In-distribution traffic: no drift. Traffic that moved (a always x, noise shifted): drift,
    one event, then a cool-down. Ground truth that disagrees with the model: degraded."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from flows.monitor import MonitorParams, monitor

    events = EventsWorker.instance(AssertingEventsClient)
    monkeypatch.setattr(EventsWorker, "instance", lambda *_: events)
    rng = np.random.default_rng(7)

    def traffic(n: int, drifted: bool) -> list[tuple[str, dict]]:
        sent = []
        for start in range(0, n, 100):
            batch = []
            for _ in range(min(100, n - start)):
                b_id = int(rng.integers(1, 21))
                # As in training, b_id 20 has no known kind (the lookup test gave it one since:
                # send a kind the model never saw, which encodes as unknown, as it did then).
                extra = {"kind": "never-seen"} if b_id == 20 else {}
                batch.append(record("x" if drifted else str(rng.choice(["x", "y"])), b_id,
                                    noise=float(rng.normal(3.0 if drifted else 0.0)), **extra))
            ids = [p["request_id"] for p in predict(service, batch)["predictions"]]
            sent += list(zip(ids, batch, strict=True))
        return sent

    calm = traffic(600, drifted=False)
    wait_for_log(service)
    quiet = monitor(MonitorParams(dataset="routes", window_rows=600))
    assert quiet.drift["drift"] is False, quiet.drift["reason"]
    assert quiet.events == [] and quiet.report and Path(quiet.report).exists()

    moved = traffic(600, drifted=True)
    wait_for_log(service)
    found = monitor(MonitorParams(dataset="routes", window_rows=600))
    assert found.drift["drift"] is True and {"a", "noise"} <= set(found.drift["drifted"]), found.drift["reason"]
    assert found.events == ["flywheel.drift.detected"]
    assert (service.home / "evidently").is_dir() and Path(found.report).read_text().lower().count("drift") > 3
    again = monitor(MonitorParams(dataset="routes", window_rows=600))
    assert again.drift["drift"] is True and again.events == []  # cooling down

    def truth(item: dict, flip: bool) -> float:
        positive = (item["a"] == "x") != (kind_of(item["b_id"]) == "u")
        return float(positive != flip)

    for sent, flip in ((calm, False), (moved, True)):
        response = requests.post(f"{service.url}/feedback", timeout=30, json={
            "items": [{"request_id": rid, "actual": truth(item, flip)} for rid, item in sent]})
        assert response.json()["accepted"] == len(sent)
    wait_for_log(service)
    judged = monitor(MonitorParams(dataset="routes", window_rows=600))
    assert judged.performance and all(p["degraded"] for p in judged.performance), judged.performance
    assert judged.events == ["flywheel.performance.degraded"]
    events.drain()
    assert isinstance(events._client, AssertingEventsClient)
    emitted = [e for e in events._client.events if e.event.startswith(("flywheel.drift", "flywheel.performance"))]
    assert [e.event for e in emitted] == ["flywheel.drift.detected", "flywheel.performance.degraded"]
    assert emitted[0].payload["reference_feature_version"] == 0 and emitted[0].payload["champion_version"] == "1"


def test_every_dashboard_query_returns_data_from_a_real_prometheus(service, tmp_path, monkeypatch):
    """Grafana cannot be installed here: Prometheus, configured as `make up` configures it,
    finds the service through the target file `flows.deploy serve` wrote and scrapes a
    Pushgateway fed by a monitor run and a flow outcome. Every query of every panel must
    return series with the dashboard's `model` variable set to the served model (its values
    come from the target's `model` label), and none with it set to a model nobody serves."""
    import re
    import shutil
    import subprocess

    import yaml

    from core.settings import get_settings
    from devstack.stack import Ports, prometheus_config
    from flows._runtime import push_outcome
    from flows.monitor import MonitorParams, monitor
    from tests.conftest import need_service

    binaries = {name: shutil.which(name) for name in ("prometheus", "prometheus-pushgateway")}
    if not all(binaries.values()):
        need_service("Prometheus and its Pushgateway (Debian: prometheus, prometheus-pushgateway)")
    ports = {"prometheus": free_port(), "pushgateway": free_port()}
    config = yaml.safe_load(prometheus_config(Ports(pushgateway=ports["pushgateway"]), tmp_path, service.home)
                            .read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    del config["alerting"], config["rule_files"]  # no Alertmanager here
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    processes = [
        subprocess.Popen([binaries["prometheus-pushgateway"], f"--web.listen-address=127.0.0.1:{ports['pushgateway']}",
                                 f"--persistence.file={tmp_path / 'pushgateway.data'}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([binaries["prometheus"], f"--config.file={tmp_path / 'prometheus.yml'}",
                          f"--storage.tsdb.path={tmp_path / 'data'}",
                          f"--web.listen-address=127.0.0.1:{ports['prometheus']}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    api = f"http://127.0.0.1:{ports['prometheus']}/api/v1/query"
    try:
        monkeypatch.setenv("FLYWHEEL_MONITOR__PUSHGATEWAY", f"127.0.0.1:{ports['pushgateway']}")
        monkeypatch.setenv("FLYWHEEL_MONITOR__MIN_FEEDBACK", "20")
        get_settings.cache_clear()
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if requests.get(f"http://127.0.0.1:{ports['prometheus']}/-/ready", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                time.sleep(0.3)
        stop = threading.Event()

        def load() -> None:  # steady traffic and feedback while Prometheus scrapes
            i = 0
            while not stop.is_set():
                i += 1
                out = predict(service, [record("x", 1), record("x", 2)], routing_key=f"dash-{i}")
                requests.post(f"{service.url}/feedback", timeout=30, json={"items": [
                    {"request_id": out["predictions"][0]["request_id"], "actual": 0.0},  # x with kind u
                    {"request_id": out["predictions"][1]["request_id"], "actual": 1.0},  # x with kind v
                    {"request_id": f"unknown-{i}", "actual": 0.0}]})
                time.sleep(0.05)

        worker = threading.Thread(target=load)
        worker.start()
        try:
            time.sleep(4)  # some predictions with ground truth first
            monitor(MonitorParams(dataset="routes", window_rows=600))
            push_outcome(get_settings(), "ingest", failed=False)
            time.sleep(6)
        finally:
            stop.set()
            worker.join()
        def label_values(definition: str) -> set[str]:
            """Grafana's label_values(selector, label) variable query."""
            found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", definition)
            assert found, definition
            series = requests.get(f"http://127.0.0.1:{ports['prometheus']}/api/v1/series",
                                  params={"match[]": found[1]}, timeout=10).json()["data"]
            return {s[found[2]] for s in series if found[2] in s}

        def series(expr: str, model: str) -> list[float]:
            query = expr.replace("$model", model)  # as Grafana interpolates a one-value selection
            answer = requests.get(api, params={"query": query}, timeout=10).json()
            assert answer["status"] == "success", (query, answer)
            return [float(r["value"][1]) for r in answer["data"]["result"]]

        empty, unfiltered = [], []
        for board in sorted((REPO_ROOT / "deployments" / "k8s" / "base" / "monitoring" / "dashboards").glob("*.json")):
            document = json.loads(board.read_text())
            variable = next((v for v in document["templating"]["list"] if v["name"] == "model"), None)
            if variable is not None:
                assert service.model_name in label_values(variable["definition"]), (board.name, variable)
            for panel in document["panels"]:
                for target in panel["targets"]:
                    values = series(target["expr"], service.model_name)
                    if not values or all(v != v for v in values):  # no series, or only NaN
                        empty.append(f"{board.name} / {panel['title']}: {target['expr']}")
                    if variable is not None and series(target["expr"], "no-such-model"):
                        unfiltered.append(f"{board.name} / {panel['title']}: {target['expr']}")
        assert not empty, "queries without data:\n" + "\n".join(empty)
        assert not unfiltered, "queries that ignore the model variable:\n" + "\n".join(unfiltered)
        # A rollout's windows read from Prometheus (monitor.prometheus_url) are the service's own totals.
        from core.rollout import window_from_metrics, window_from_prometheus

        time.sleep(2.5)  # a scrape after the last request
        exposed = requests.get(f"{service.url}/metrics", timeout=10).text
        for version in ("1", "2"):
            scraped = window_from_prometheus(f"http://127.0.0.1:{ports['prometheus']}", service.model_name, version)
            assert scraped == window_from_metrics(exposed, version) and scraped.requests > 0, version
        port = service.url.rsplit(":", 1)[1]
        target_file = service.home / "prometheus" / "targets" / f"{service.model_name}-{port}.json"
        assert json.loads(target_file.read_text()) == [{"targets": [f"127.0.0.1:{port}"],
                                                        "labels": {"model": service.model_name, "dataset": "routes"}}]
    finally:
        get_settings.cache_clear()
        for process in processes:
            process.terminate()
            process.wait(timeout=20)


def test_a_faulty_challenger_is_dropped_online_and_never_promoted(service, tmp_path):
    """A challenger that predicts a constant gets its share of live traffic and ground truth;
    flows.evaluate drops it (never promotes it) and the service serves the champion alone."""
    import torch

    from core.model import load_model, save_model
    from core.registry import CHALLENGER, CHAMPION, Registry, load_version
    from core.settings import get_settings
    from flows.evaluate import EvaluateParams, evaluate

    registry = Registry.for_uri(get_settings().tracking_uri)
    champion = registry.version_by_alias(service.model_name, CHAMPION)
    loaded = load_version(registry, service.model_name, champion)
    model = load_model(_download(champion), champion.tags["flywheel.weights_sha256"])
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()  # every score is sigmoid(0) = 0.5
    folder = tmp_path / "constant"
    sha = save_model(model, folder, loaded.stats.to_json())
    faulty = registry.register(service.model_name, folder.resolve().as_uri(), champion.run_id,
                               {**champion.tags, "flywheel.weights_sha256": sha}, [CHALLENGER],
                               reason="test: a faulty challenger")
    response = requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {service.token}"},
                             timeout=60)
    assert response.json()["challenger"]["version"] == str(faulty.version)

    rng = np.random.default_rng(11)
    sent = []
    for i in range(16):
        # distinct records: "constant" is judged over min_rows distinct inputs
        batch = [record(str(rng.choice(["x", "y"])), int(rng.integers(1, 20)), noise=round(float(rng.normal()), 6))
                 for _ in range(100)]
        out = predict(service, batch, routing_key=f"user-{i}")["predictions"]
        sent += [(p, item) for p, item in zip(out, batch, strict=True)]
    on_faulty = [p for p, _ in sent if p["model_version"] == str(faulty.version)]
    assert on_faulty and {p["score"] for p in on_faulty} == {0.5}
    feedback = [{"request_id": p["request_id"],
                 "actual": float((item["a"] == "x") != (kind_of(item["b_id"]) == "u"))} for p, item in sent]
    for start in (0, 800):  # at most serving.max_records items per request
        answer = requests.post(f"{service.url}/feedback", json={"items": feedback[start:start + 800]}, timeout=30)
        assert answer.json()["accepted"] == 800, answer.text
    wait_for_log(service)

    result = evaluate(EvaluateParams(dataset="routes", min_rows=100))
    assert result.action == "drop" and result.acted and "constant" in result.reason, result.reason
    aliases = registry.aliases(service.model_name)
    assert aliases[CHAMPION] == str(champion.version) and aliases[CHALLENGER] == str(champion.version)
    tag = registry.client.get_model_version(service.model_name, str(faulty.version)).tags["flywheel.ab_decision"]
    assert '"action": "drop"' in tag
    served = admin_get(service, "/models")
    assert served["challenger"] is None and served["champion"]["version"] == str(champion.version)
    # Put the test's challenger back for what follows: v2, as the fixture left it.
    registry.move_alias(service.model_name, CHALLENGER, "2", "test: restore")
    requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {service.token}"}, timeout=60)


def _download(version) -> Path:
    import mlflow

    from core.settings import get_settings

    return Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source,
                                                    tracking_uri=get_settings().tracking_uri))


def test_a_share_set_on_the_registry_is_routed_by_within_the_poll(service):
    """A rollout step or the bandit sets the challenger's share on the registered model; the
    service routes by it within serving.alias_poll_s, and only for the challenger it names."""
    import uuid

    from core.allocation import ALLOCATION_TAG, Allocation
    from core.registry import Registry
    from core.settings import get_settings

    registry = Registry.for_uri(get_settings().tracking_uri)
    challenger = str(admin_get(service, "/models")["challenger"]["version"])

    def routed_to_challenger(share: float, source: str) -> float:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            status = admin_get(service, "/models")
            if status["challenger_share"] == share and status["allocation"] == source:
                break
            time.sleep(0.1)
        else:
            raise AssertionError(f"the service still routes by {status['challenger_share']} ({status['allocation']})")
        answers = [predict(service, [record("x", 1)], routing_key=uuid.uuid4().hex)["predictions"][0]
                   for _ in range(30)]
        return sum(a["variant"] == "challenger" for a in answers) / len(answers)

    try:
        registry.set_allocation(service.model_name, Allocation(1.0, challenger, "manual", "test: all of it"))
        assert routed_to_challenger(1.0, "manual") == 1.0
        registry.set_allocation(service.model_name, Allocation(0.0, challenger, "manual", "test: none of it"))
        assert routed_to_challenger(0.0, "manual") == 0.0
        registry.set_allocation(service.model_name, Allocation(1.0, "999", "manual", "test: another challenger's"))
        assert 0.0 < routed_to_challenger(0.5, "configured") < 1.0  # the fixture's challenger_share
    finally:
        registry.client.delete_registered_model_tag(service.model_name, ALLOCATION_TAG)


def _misbehaving_challenger(service: Service, tmp_path: Path, family: str) -> str:
    """The champion's network registered again as challenger, scored by a family of
    tests/misbehaving.py (the same weights: its hash holds); the service loads it."""
    import shutil

    from core.families import SPEC_FILE
    from core.registry import CHALLENGER, CHAMPION, Registry
    from core.settings import get_settings

    registry = Registry.for_uri(get_settings().tracking_uri)
    champion = registry.version_by_alias(service.model_name, CHAMPION)
    folder = tmp_path / family
    shutil.copytree(_download(champion), folder)
    spec = json.loads((folder / SPEC_FILE).read_text())
    (folder / SPEC_FILE).write_text(json.dumps({**spec, "family_path": f"tests.misbehaving:{family}"}))
    version = registry.register(service.model_name, folder.resolve().as_uri(), champion.run_id, dict(champion.tags),
                                [CHALLENGER], reason=f"test: a {family} challenger")
    response = requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {service.token}"},
                             timeout=60)
    assert response.json()["challenger"]["version"] == str(version.version), response.text
    return str(version.version)


def rollout_under_load(service: Service, **plan) -> tuple[Any, dict[str, str], list[str], list[str]]:
    """``flows.deploy rollout`` while 4 clients post under new routing keys: its result, the
    aliases it left, the versions that answered and the failures. The rollout must leave no
    share behind; the fixture's aliases (champion v1, challenger v2) are put back after."""
    from core.allocation import ALLOCATION_TAG
    from core.registry import CHALLENGER, CHAMPION, Registry
    from core.settings import get_settings
    from flows.deploy import DeployParams, deploy

    registry = Registry.for_uri(get_settings().tracking_uri)
    stop = threading.Event()
    answered: list[tuple[float, str, str]] = []
    failures: list[str] = []
    clients = [threading.Thread(target=steady_load, args=(service, stop, answered, failures, None)) for _ in range(4)]
    for client in clients:
        client.start()
    try:
        # A challenger just (re)loaded answers its first calls slowly (its first model call and
        # transform); a second of traffic (shadowed by the challenger) warms it, as a real
        # rollout's 300 s holds would dilute them.
        time.sleep(1)
        result = deploy(DeployParams(action="rollout", dataset="routes", steps=[0.25, 0.5, 1.0], max_wait_s=60,
                                     **plan))
        time.sleep(1)  # requests after the rollout's last move
    finally:
        stop.set()
        for client in clients:
            client.join()
        aliases = registry.aliases(service.model_name)
        allocation = registry.tags(service.model_name).get(ALLOCATION_TAG)
        registry.clear_allocation(service.model_name)
        registry.move_alias(service.model_name, CHAMPION, "1", "test: restore")
        registry.move_alias(service.model_name, CHALLENGER, "2", "test: restore")
        requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {service.token}"}, timeout=60)
    assert allocation is None, f"the rollout left its share behind: {allocation}"
    return result, aliases, [version for _, version, _ in answered], failures


@pytest.mark.parametrize("family,breached", [("SlowNet", "p99 latency"), ("FlakyNet", "error rate")])
def test_a_rollout_rolls_a_slow_or_failing_challenger_back_at_the_first_step_failing_no_request(
        service, tmp_path, family, breached):
    """`flows.deploy rollout` under load: a challenger 50 ms slower, or failing every 20th call, is
    rolled back after the first step's analysis (recorded alias move, the service reloads), and
    every request is answered meanwhile (a failed challenger call is answered by the champion)."""
    from core.registry import CHALLENGER, CHAMPION, Registry
    from core.settings import get_settings

    registry = Registry.for_uri(get_settings().tracking_uri)
    champion = registry.aliases(service.model_name)[CHAMPION]
    challenger = _misbehaving_challenger(service, tmp_path, family)
    result, aliases, seen, failures = rollout_under_load(service, hold_s=3, min_requests=150)
    rollout = result.rollout
    assert rollout["outcome"] == "rolled_back" and len(rollout["steps"]) == 1, rollout
    failed = [c["name"] for c in rollout["steps"][0]["checks"] if not c["passed"]]
    assert failed == [breached], rollout["steps"][0]
    assert aliases[CHAMPION] == champion and aliases[CHALLENGER] == champion, aliases
    assert not failures, failures[:5]
    assert challenger in seen and len(seen) > 300
    history = registry.history(service.model_name)
    assert any(e.alias == CHALLENGER and e.from_version == challenger and "rollout rolled back" in e.reason
               for e in history), history[-3:]


def test_a_rollout_of_a_healthy_challenger_reaches_100_percent_and_promotes(service):
    """The fixture's gradient-boosted challenger against the network: every step passes, the
    last promotes it, and it serves alone."""
    from core.registry import CHALLENGER, CHAMPION

    result, aliases, seen, failures = rollout_under_load(service, hold_s=2, min_requests=60)
    rollout = result.rollout
    assert rollout["outcome"] == "promoted", rollout
    assert [s["share"] for s in rollout["steps"]] == [0.25, 0.5, 1.0]
    assert aliases == {CHAMPION: "2", CHALLENGER: "2"}, aliases
    assert not failures, failures[:5]


def test_schemathesis_checks_all_find_nothing_against_the_openapi_document(service, tmp_path):
    """``schemathesis run --checks all``: no 5xx, every status and body as documented (one
    error shape), schema-valid input accepted, schema-invalid input refused, on every route the
    document lists. Found before: a 400's detail documented as a string, a 413 without
    ``error``, a null routing_key accepted though documented as a string, a 500 on a multipart
    body, valid-looking years and texts refused."""
    import subprocess
    import sys

    schemathesis = Path(sys.executable).with_name("schemathesis")
    ran = subprocess.run([str(schemathesis), "run", f"{service.url}/docs.json", "--checks", "all",
                          "--max-examples", "150", "--seed", "20261205", "--request-timeout", "30",
                          "--no-color"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert ran.returncode == 0, ran.stdout[-6000:] + ran.stderr[-2000:]
    assert "6 selected / 6 total" in ran.stdout and "No issues found" in ran.stdout, ran.stdout[-3000:]


def test_two_workers_switch_together_under_load_and_take_each_others_feedback(service, monkeypatch):
    """The default of two workers (issue 20): both serve; a champion moved under load, then a
    reload (which reaches one worker), reaches every worker within the reported bound: no
    request scored by the old model after the switch time plus serving.alias_poll_s; feedback
    for a request the other worker answered is accepted at once."""
    from core.registry import CHAMPION, Registry
    from core.settings import get_settings
    from flows.deploy import DeployParams, deploy
    from serving.control import read_state

    registry = Registry.for_uri(f"sqlite:///{service.home / 'mlflow.db'}", actor="test")
    port = int(service.url.rsplit(":", 1)[1])
    deploy(DeployParams(action="stop", dataset="routes"))
    monkeypatch.setenv("FLYWHEEL_SERVING__WORKERS", "2")
    deploy(DeployParams(action="serve", dataset="routes", port=port, challenger_share=0.0))
    stop = threading.Event()
    seen: list[tuple[float, str, str]] = []
    failures: list[str] = []
    clients = [threading.Thread(target=steady_load, args=(service, stop, seen, failures)) for _ in range(6)]
    moved = None
    try:
        token = read_state(get_settings(), service.model_name).token
        pids = {requests.get(f"{service.url}/admin/models", headers={"Authorization": f"Bearer {token}"},
                             timeout=10).json()["pid"] for _ in range(40)}
        assert len(pids) == 2, f"one worker answered 40 status requests: {pids}"
        for client in clients:
            client.start()
        time.sleep(2)
        (before,) = {v for _, v, _ in seen}
        new = "2" if before == "1" else "1"
        registry.move_alias(service.model_name, CHAMPION, new, "two workers")  # then a reload, as deploy asks
        moved = before
        answer = requests.post(f"{service.url}/admin/reload", headers={"Authorization": f"Bearer {token}"},
                               timeout=60).json()
        switched, bound = time.monotonic(), answer["all_workers_within_s"]
        assert answer["workers"] == 2 and bound == get_settings().serving.alias_poll_s
        time.sleep(bound + 3)
        stop.set()
        for client in clients:
            client.join()
        assert not failures, failures[:5]
        late = [(round(t - switched, 2), v) for t, v, _ in seen if t > switched + bound + 0.5 and v != new]
        assert not late, f"scored by the old model after the switch plus {bound} s: {late[:5]}"
        assert len([1 for t, _, _ in seen if t > switched + bound + 0.5]) > 50
        # Feedback at once for 200 answers of both workers: none is unknown (the siblings' journal).
        ids = [request_id for _, _, request_id in seen[-200:]]
        answer = requests.post(f"{service.url}/feedback", timeout=30,
                               json={"items": [{"request_id": i, "actual": 1.0} for i in ids]}).json()
        assert answer["unknown_request_ids"] == [] and answer["accepted"] == len(ids), answer
    finally:  # the tests after this one get the module's service as it was
        stop.set()
        for client in clients:
            if client.is_alive():
                client.join()
        if moved is not None:
            registry.move_alias(service.model_name, CHAMPION, moved, "back")
        deploy(DeployParams(action="stop", dataset="routes"))
        monkeypatch.setenv("FLYWHEEL_SERVING__WORKERS", "1")
        deploy(DeployParams(action="serve", dataset="routes", port=port, challenger_share=0.5, shadow=True))
        service.token = read_state(get_settings(), service.model_name).token  # a new process, a new token


def test_overload_is_answered_at_once_with_429(service, monkeypatch):
    """A service allowed 2 requests in flight: a burst of 40 gets 200s and 429s, promptly."""
    from concurrent.futures import ThreadPoolExecutor

    from core.settings import get_settings
    from flows.deploy import DeployParams, deploy
    from serving.control import read_state

    port = int(service.url.rsplit(":", 1)[1])
    deploy(DeployParams(action="stop", dataset="routes"))
    monkeypatch.setenv("FLYWHEEL_SERVING__MAX_CONCURRENCY", "2")
    deploy(DeployParams(action="serve", dataset="routes", port=port, challenger_share=0.5, shadow=True))
    body = {"records": [record("x", 1 + i % 19) for i in range(500)]}

    def send(_: int) -> tuple[int, float]:
        started = time.monotonic()
        response = requests.post(f"{service.url}/predict", json=body, timeout=60)
        return response.status_code, time.monotonic() - started

    try:
        with ThreadPoolExecutor(40) as pool:
            results = list(pool.map(send, range(40)))
        codes = Counter(code for code, _ in results)
        assert set(codes) <= {200, 429} and codes[429] > 0 and codes[200] > 0, codes
        assert max(t for code, t in results if code == 429) < 5.0
        assert requests.get(f"{service.url}/readyz", timeout=5).status_code == 200
    finally:  # the tests after this one get the module's service as it was, not one allowing 2
        deploy(DeployParams(action="stop", dataset="routes"))
        monkeypatch.delenv("FLYWHEEL_SERVING__MAX_CONCURRENCY")
        deploy(DeployParams(action="serve", dataset="routes", port=port, challenger_share=0.5, shadow=True))
        service.token = read_state(get_settings(), service.model_name).token  # a new process, a new token


def test_a_tampered_model_stops_serve_at_once_with_the_reason(service):
    """Found: `flows.deploy serve` of a model whose weights do not match their checksum waited
    its whole --wait-s (300 s), retrying every 5 s, although that cannot fix itself."""
    import shutil

    from core.registry import CHAMPION, Registry
    from core.settings import get_settings
    from flows._runtime import model_name_for
    from flows.deploy import DeployParams, deploy
    from serving.control import DeployError

    registry = Registry.for_uri(get_settings().tracking_uri)
    champion = registry.version_by_alias(service.model_name, CHAMPION)
    folder = Path(str(service.home)) / "tampered"
    shutil.copytree(_download(champion), folder)
    weights = next(p for p in folder.iterdir() if p.suffix in (".safetensors", ".txt"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    # Another model name (the smoke-test one), so that the module's service is left alone.
    registry.register(model_name_for("routes", True), folder.resolve().as_uri(), champion.run_id, champion.tags,
                      [CHAMPION], reason="test: tampered weights")
    started = time.monotonic()
    with pytest.raises(DeployError, match="does not match") as refused:
        deploy(DeployParams(action="serve", dataset="routes", smoke_test=True, port=free_port(), wait_s=300))
    assert time.monotonic() - started < 60, "serve waited for a failure that cannot heal"
    assert "waiting will not fix it" in str(refused.value)


def test_a_worker_killed_under_load_loses_no_answered_prediction(service):
    """SIGKILL of the BentoML worker under 16 clients: every prediction answered with a 200
    reaches the log once (the restarted worker commits the killed one's journal), and requests
    arriving while the new worker loads its models wait for them instead of getting a 503."""
    import signal

    import psutil

    from core.lake import Lake

    pid = json.loads((Path(service.home) / "serving" / f"{service.model_name}.json").read_text())["pid"]

    def workers() -> list[psutil.Process]:
        found = []
        for process in psutil.Process(pid).children(recursive=True):
            try:
                if "_bentoml_impl.worker" in " ".join(process.cmdline()):
                    found.append(process)
            except psutil.Error:  # gone, or a zombie not yet reaped
                continue
        return found

    (worker,) = workers()
    answered: list[str] = []
    refused: Counter = Counter()
    stop, killed_at = threading.Event(), []

    def client(n: int) -> None:
        i = 0
        while not stop.is_set():
            i += 1
            try:
                response = requests.post(f"{service.url}/predict", timeout=60, json={
                    "records": [record("x", 1 + (n + i) % 19), record("y", 1 + i % 19)], "routing_key": f"k{n}-{i}"})
            except requests.RequestException as exc:  # in flight at the killed worker: never answered
                refused[type(exc).__name__] += 1
                continue
            if response.status_code == 200:
                answered.extend(p["request_id"] for p in response.json()["predictions"])
            else:
                refused[response.status_code] += 1

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        before = len(answered)
        worker.send_signal(signal.SIGKILL)  # as the OOM killer or `kill -9` would
        killed_at.append(len(answered))
        deadline = time.time() + 90
        while time.time() < deadline and not (workers() and len(answered) > killed_at[0] + 200):
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert before > 50 and len(answered) > killed_at[0] + 200, (before, len(answered), dict(refused))
    assert not [k for k in refused if isinstance(k, int)], dict(refused)  # no 503 storm while it restarted
    (restarted,) = workers()
    assert restarted.pid != worker.pid
    lake = Lake(service.lake)
    uri = lake.uri("serving", "routes", "predictions")
    deadline, missing = time.time() + 60, set(answered)
    while missing and time.time() < deadline:
        time.sleep(1)
        logged = lake.read_pandas(uri, columns=["request_id", "served"])
        served = logged[logged["served"]]
        missing = set(answered) - set(served["request_id"])
    assert not missing, f"{len(missing)} of {len(answered)} answered predictions lost"
    assert served["request_id"].is_unique  # and none twice
    assert admin_get(service, "/models")["log_recovered"] > 0  # the killed worker's rows came from its journal
    print(f"killed under load: {len(answered)} answered, 0 lost, {killed_at[0]} before the kill, "
          f"not answered (in flight at the kill): {dict(refused)}")


def test_a_graceful_stop_under_load_answers_every_request_it_took(service):
    """Last in this module: it stops the service, under 16 clients. Found: each client's request
    at the stop was cut with a reset. Now the stop drains: /readyz fails first (a balancer would
    stop sending), then new connections are refused at once; every request the service took is
    answered and logged exactly once, and one it did not take was never processed (its routing
    key is nowhere in the log), so sending it again is safe."""
    from core.lake import Lake
    from flows.deploy import DeployParams, deploy

    lake = Lake(service.lake)
    uri = lake.uri("serving", "routes", "predictions")
    answered: dict[str, list[str]] = {}
    failed: dict[str, str] = {}
    resets: Counter[int] = Counter()
    reasons: Counter[str] = Counter()
    stop = threading.Event()

    def client(n: int) -> None:
        session = requests.Session()
        i = 0
        while not stop.is_set():
            i += 1
            key = f"g{n}-{i}"
            try:
                response = session.post(f"{service.url}/predict", timeout=60, json={
                    "records": [record("x", 1 + (n + i) % 19), record("y", 2)], "routing_key": key})
            except requests.ConnectionError as exc:
                refused = "refused" in str(exc).lower()
                failed[key] = "refused" if refused else "reset"
                if not refused:
                    resets[n] += 1
                    reasons[type(exc.__context__ or exc).__name__ + ": " + str(exc)[-60:]] += 1
                if refused:
                    return  # the service is gone
                continue
            if response.status_code == 200:
                answered[key] = [p["request_id"] for p in response.json()["predictions"]]
            else:
                failed[key] = str(response.status_code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(16)]
    stopper = threading.Thread(target=deploy, args=(DeployParams(action="stop", dataset="routes"),))
    readiness: list[int | str] = []
    for thread in threads:
        thread.start()
    try:
        time.sleep(3)
        took = len(answered)
        stopper.start()
        while stopper.is_alive():
            try:
                readiness.append(requests.get(f"{service.url}/readyz", timeout=5).status_code)
            except requests.ConnectionError:
                readiness.append("refused")
            time.sleep(0.05)
    finally:
        stop.set()
        for thread in threads + [stopper]:
            if thread.ident is not None:
                thread.join()
    logged = lake.read_pandas(uri, columns=["request_id", "routing_key", "served", "variant", "inputs"])
    served = logged[logged["served"]]
    ids = [request_id for ids in answered.values() for request_id in ids]
    outcome = Counter(failed.values())
    print(f"graceful stop under 16 clients: {len(answered)} answered ({len(answered) - took} during the stop), "
          f"not answered: {dict(outcome)}; readiness seen: {[k for k, _ in itertools.groupby(readiness)]}")
    assert took > 50 and len(answered) > took
    # Ready, then not ready while draining, then gone: never gone while still ready.
    assert [k for k, _ in itertools.groupby(readiness)][-2:] == [503, "refused"], readiness
    assert set(ids) <= set(served["request_id"]), f"{len(set(ids) - set(served['request_id']))} answered not logged"
    assert served["request_id"].is_unique
    cut = set(failed) & set(served["routing_key"])
    assert not cut, f"{len(cut)} requests processed but not answered: {sorted(cut)[:5]}"
    assert not [k for k in outcome if k not in ("refused", "reset")], outcome  # no 5xx
    # Each client ends on a refusal. A reset is only for a request the service never read (the
    # `cut` check above): a connection the kernel had queued in the instant the listening socket
    # closed, or one a worker closed at SIGTERM before reading it. Under a loaded 2-core CI run
    # a client can meet both (17 resets for 16 clients once), so the bound is per client; the
    # reasons are printed to tell the two apart.
    print(f"resets per client: {sorted(resets.values(), reverse=True)}; {dict(reasons)}")
    assert outcome["refused"] == 16, outcome
    assert max(resets.values(), default=0) <= 2, resets
    assert json.loads(served["inputs"].iloc[0])["a"] in ("x", "y")
    # Shadow mode: the challenger scored the champion's records too, logged but not served.
    shadow = logged[~logged["served"]]
    assert len(shadow) and set(shadow["variant"]) == {"challenger"}
