"""The Flywheel BentoML service: champion and challenger side by side for one dataset.

    FLYWHEEL_SERVING__DATASET=flights bentoml serve serving.service:Flywheel --host 127.0.0.1

(``python -m flows.deploy serve`` does this, supervised.) The dataset's contract decides the
request model, its joins and derivations; the registry's ``champion`` and ``challenger`` aliases
decide the models (weights' sha256 checked, safetensors, nothing unpickled). Routes:

- ``POST /predict``: records -> score, decision, variant, model version, request id, the fields the
  model did not read.
- ``POST /feedback``: ground truth for earlier request ids.
- ``GET /admin/models``, ``POST /admin/reload``: bearer token from ``FLYWHEEL_SERVING_ADMIN_TOKEN``;
  with none configured the admin routes refuse every request.
- ``/livez``, ``/readyz`` (ready once models and lookups are loaded), ``/metrics``, ``/docs.json``.

Models and lookups load in a background thread, so a broken registry or lake leaves the
service up and not ready (BentoML restarts a worker whose ``__init__`` raises, forever) and
the reason is logged and shown by ``/admin/models``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import math
import os
import signal
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, cast

import bentoml
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from core.allocation import effective_share
from core.compat.bentoml import cancel_request_timers
from core.contract import load_contract
from core.lake import Lake
from core.lineage import Lineage
from core.registry import CHALLENGER, CHAMPION, LoadedVersion, Registry, cannot_heal, load_version
from core.settings import get_settings
from serving.auth import refusal
from serving.batcher import Batcher
from serving.drain import DRAINING, CloseWhenDraining
from serving.drain import begin as begin_drain
from serving.features import Lookups, inputs
from serving.logbook import LogBook
from serving.metrics import Metrics
from serving.middleware import BodyLimit, ErrorShape, JsonOnly
from serving.router import route
from serving.schema import (
    FeedbackItem,
    FeedbackResponse,
    Prediction,
    PredictResponse,
    record_model,
    scored_fields,
)

log = logging.getLogger("flywheel.serving")

cancel_request_timers()  # before BentoML builds the app: a finished request is not kept for traffic.timeout
SETTINGS = get_settings()
CONFIG = SETTINGS.serving
CONTRACT = load_contract(CONFIG.dataset)
MODEL_NAME = CONFIG.model_name or SETTINGS.train.model_name.format(dataset=CONTRACT.name)
Record = record_model(CONTRACT)
SCORED = scored_fields(CONTRACT)  # a record's other fields are accepted, logged and listed as ignored


def threshold(model: LoadedVersion) -> float:
    """The decision threshold: settings' serving.threshold, else the model's own (chosen on
    validation at training and recorded in its metrics), else 0.5."""
    if CONFIG.threshold is not None:
        return CONFIG.threshold
    return float(model.lineage.metrics.get("threshold", 0.5))


@dataclass(frozen=True)
class Deployed:
    """What serves now: swapped as a whole, so a request sees one consistent pair."""

    champion: LoadedVersion
    challenger: LoadedVersion | None
    loaded_at: str

    def describe(self) -> dict[str, Any]:
        def one(model: LoadedVersion | None) -> dict[str, Any] | None:
            if model is None:
                return None
            return {"name": model.name, "version": model.version, "family": model.model.family_name,
                    "feature_version": model.tags.get(Lineage.tag("feature_version")),
                    "metrics": model.lineage.metrics}
        return {"champion": one(self.champion), "challenger": one(self.challenger), "loaded_at": self.loaded_at}


def _bearer_ok(request: Request) -> JSONResponse | None:
    """None when the request carries the configured admin token; else the refusal."""
    refused = refusal(request.headers)
    if refused is None:
        return None
    status, detail = refused
    return JSONResponse({"detail": detail}, status_code=status,
                        headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)


async def _admin_models(request: Request) -> JSONResponse:
    if (refusal := _bearer_ok(request)) is not None:
        return refusal
    service: Flywheel = bentoml.get_current_service()
    return JSONResponse(service.status())


async def _admin_reload(request: Request) -> JSONResponse:
    if (refusal := _bearer_ok(request)) is not None:
        return refusal
    service: Flywheel = bentoml.get_current_service()
    try:
        changed = await asyncio.to_thread(service.reload)
    except Exception as exc:  # noqa: BLE001 - the old models keep serving; say why
        return JSONResponse({"detail": f"reload failed, still serving the models loaded before: {exc}",
                             **service.status()}, status_code=502)
    # This worker switched now; the marker tells the others, which look every alias_poll_s.
    RELOAD_MARKER.parent.mkdir(parents=True, exist_ok=True)
    RELOAD_MARKER.touch()
    service.marker_seen = _marker_time()  # this worker has just reloaded
    return JSONResponse({"changed": changed, "switched_at": datetime.now(UTC).isoformat(),
                         "all_workers_within_s": CONFIG.alias_poll_s if CONFIG.workers > 1 else 0.0,
                         **service.status()})


# Touched by a worker that was asked to reload (POST /admin/reload reaches one worker): every
# other worker sees it within serving.alias_poll_s and reloads too.
RELOAD_MARKER = SETTINGS.home / "serving" / f"{MODEL_NAME}.reload-asked"


def _marker_time() -> int:
    try:
        return RELOAD_MARKER.stat().st_mtime_ns
    except OSError:
        return 0


def _freeze_what_is_loaded() -> None:
    """Out of the garbage collector's sight: what the worker holds from now on (libraries,
    models, lookups) is not cyclic garbage, so a full collection walks only what requests
    allocate. It walked ~500,000 objects, a 300 ms stall every few seconds under load. What an
    earlier call froze is collected once first, so the cycles of models no longer served are
    freed rather than kept."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


def _show_our_logs() -> None:
    """BentoML's server logging passes WARNING and up from loggers other than its own, and
    disables loggers that existed before it was configured: ours (loading, draining, the log's
    recovery) go to the service's log at INFO."""
    logging.getLogger("flywheel").setLevel(logging.INFO)
    for name, logger in logging.root.manager.loggerDict.items():
        if name.startswith("flywheel") and isinstance(logger, logging.Logger):
            logger.disabled = False


admin = Starlette(routes=[Route("/models", _admin_models, methods=["GET"]),
                          Route("/reload", _admin_reload, methods=["POST"])])


@bentoml.asgi_app(admin, path="/admin")
@bentoml.service(
    name="flywheel",
    workers=CONFIG.workers,
    traffic={"timeout": 30, "max_concurrency": CONFIG.max_concurrency},
    http={"host": CONFIG.host, "port": CONFIG.port},
    metrics={"enabled": True, "namespace": "bentoml_service"},
)
class Flywheel:
    """Champion/challenger serving of one dataset's registered model."""

    def __init__(self) -> None:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
        _show_our_logs()
        self.lake = Lake(SETTINGS.lake, SETTINGS.storage_options or None)
        self.registry = Registry.for_uri(SETTINGS.tracking_uri, actor="serving")
        self.metrics = Metrics()
        self.deployed: Deployed | None = None
        self.problem: str | None = "loading"
        self.problem_heals = True  # False: loading failed for good (see core.registry.cannot_heal)
        self.lookups = Lookups(self.lake, CONTRACT)
        self.logbook = LogBook(self.lake, CONTRACT.name, CONFIG.log_flush_rows, CONFIG.log_flush_s,
                               journal=CONFIG.log_journal or SETTINGS.home / "serving" / "journal" / CONTRACT.name,
                               fsync=CONFIG.log_fsync,
                               on_failure=lambda table, exc: self.metrics.log_failures.labels(table=table).inc(),
                               on_backlog=self.metrics.log_backlog.set)
        self.batcher = Batcher(self._score, CONFIG.max_batch_size,
                               on_batch=lambda model, n: self.metrics.batch_size.observe(n))
        self.recent: OrderedDict[str, None] = OrderedDict()
        self._recent_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._stop = threading.Event()
        self.marker_seen = _marker_time()
        self.allocation: tuple[float, str, str | None] = (CONFIG.challenger_share, "configured", None)
        threading.Thread(target=self._keep_loaded, name="flywheel-loader", daemon=True).start()

    # ------------------------------------------------------------------ loading
    def _keep_loaded(self) -> None:
        """Load models and lookups until both are there; then follow the registry's aliases
        (every ``alias_poll_s``: a promotion made anywhere, the MLflow UI included, is served
        within that) and refresh lookups on a timer."""
        reader = Registry.reader_for_uri(SETTINGS.tracking_uri)  # a cheap read of the aliases
        next_lookups = 0.0
        while not self._stop.is_set():
            try:
                if self.deployed is None:
                    self.reload()
                else:
                    if (asked := _marker_time()) != self.marker_seen:  # a reload asked of a sibling worker
                        self.marker_seen = asked
                        self.reload()
                    elif self._aliases_moved(reader) and self.reload():
                        log.info("serving %s: followed the registry's aliases", MODEL_NAME)
                    if time.monotonic() >= next_lookups:
                        next_lookups = time.monotonic() + CONFIG.lookup_refresh_s
                        if self.lookups.refresh():
                            self.metrics.lookup_reloads.inc()
                self._follow_allocation(reader)
                self.problem, self.problem_heals = None, True
            except Exception as exc:  # noqa: BLE001 - keep serving (or keep trying); say why
                self.problem, self.problem_heals = f"{type(exc).__name__}: {exc}", not cannot_heal(exc)
                log.error("serving %s: %s", MODEL_NAME, self.problem)
            self._stop.wait(5.0 if self.deployed is None else min(CONFIG.alias_poll_s, CONFIG.lookup_refresh_s))
        return

    def _aliases_moved(self, reader: Registry) -> bool:
        deployed = self.deployed
        if deployed is None:
            return True
        aliases = reader.aliases(MODEL_NAME)
        champion, challenger = aliases.get(CHAMPION), aliases.get(CHALLENGER)
        wanted = (champion, None if challenger == champion else challenger)
        serving = (str(deployed.champion.version), str(deployed.challenger.version) if deployed.challenger else None)
        return serving != wanted

    def _follow_allocation(self, reader: Registry) -> None:
        """The challenger's share: a rollout's step or the bandit's, set on the registered model
        for the challenger being served (``core.allocation``), else serving.challenger_share."""
        deployed = self.deployed
        challenger = str(deployed.challenger.version) if deployed is not None and deployed.challenger else None
        share, source = effective_share(reader.tags(MODEL_NAME), challenger, CONFIG.challenger_share)
        if (share, source, challenger) != self.allocation:
            log.info("serving %s: challenger v%s share %.3f (%s)", MODEL_NAME, challenger, share, source)
            self.allocation = (share, source, challenger)

    def routing_share(self, deployed: Deployed) -> tuple[float, str]:
        """(share, where it came from) routing uses: the allocation followed for this
        challenger; for one just loaded (until the next poll), the configured share."""
        share, source, made_for = self.allocation
        challenger = str(deployed.challenger.version) if deployed.challenger else None
        return (share, source) if made_for == challenger else (CONFIG.challenger_share, "configured")

    def reload(self) -> bool:
        """Load the registry's champion and challenger (reusing those already loaded) and
        refresh the lookups; swap them in at once. True if the models changed."""
        with self._reload_lock:
            self.registry.require(MODEL_NAME)
            current = self.deployed
            loaded = {m.version: m for m in (current.champion, current.challenger) if m} if current else {}

            def fetch(alias: str) -> LoadedVersion | None:
                version = self.registry.version_by_alias(MODEL_NAME, alias)
                if version is None:
                    return None
                return loaded.get(str(version.version)) or load_version(self.registry, MODEL_NAME, version)

            champion = fetch(CHAMPION)
            if champion is None:
                raise LookupError(f"{MODEL_NAME} has no {CHAMPION!r} alias: train and register a model first")
            challenger = fetch(CHALLENGER)
            if challenger is not None and challenger.version == champion.version:
                challenger = None  # the same model: nothing to compare
            self.lookups.refresh()
            if current is None:
                _freeze_what_is_loaded()  # before the worker is ready
            changed = current is None or (champion.version, getattr(challenger, "version", None)) != (
                current.champion.version, getattr(current.challenger, "version", None))
            self.deployed = Deployed(champion, challenger, datetime.now(UTC).isoformat(timespec="seconds"))
            if changed and current is not None:
                _freeze_what_is_loaded()  # the models let go may hold reference cycles
            if changed:
                log.info("serving %s: champion v%s, challenger %s", MODEL_NAME, champion.version,
                         f"v{challenger.version}" if challenger else "none")
            self.metrics.set_models(self.deployed)
            return changed

    @bentoml.on_startup
    async def _listen_for_drain(self) -> None:
        """SIGUSR1 (sent by ``flows.deploy stop`` to each worker before its SIGTERM) starts the
        drain (see serving.drain)."""
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, self.drain)

    def drain(self) -> None:
        if begin_drain(CONFIG.drain_s, CONFIG.port):
            log.info("serving %s: draining for %.1f s (not ready; every response closes its connection), "
                     "then no new connections", MODEL_NAME, CONFIG.drain_s)

    def __is_ready__(self) -> bool:
        if DRAINING.is_set():
            return False
        return self.deployed is not None and bool(self.lookups.snapshot.versions or not CONTRACT.joins)

    def status(self) -> dict[str, Any]:
        share, source = self.routing_share(self.deployed) if self.deployed else (0.0, "configured")
        return {"model_name": MODEL_NAME, "dataset": CONTRACT.name, "ready": self.__is_ready__(),
                "problem": self.problem, "problem_heals": self.problem_heals, "draining": DRAINING.is_set(),
                "workers": CONFIG.workers, "pid": os.getpid(),
                **(self.deployed.describe() if self.deployed else {}),
                "lookups": self.lookups.snapshot.versions, "challenger_share": share, "allocation": source,
                "shadow": CONFIG.shadow, "routing_field": CONFIG.routing_field,
                "log_backlog": self.logbook.backlog, "log_failures": self.logbook.failures,
                "log_recovered": self.logbook.recovered}

    # ------------------------------------------------------------------ scoring
    def _score(self, model: LoadedVersion, rows: list[dict[str, Any]]) -> list[tuple[float, list[str]]]:
        """One model call for a batch of validated records (runs in a worker thread)."""
        categorical, numeric, missing = inputs(rows, self.lookups.snapshot, CONTRACT, model.stats)
        scores = model.model.predict(categorical, numeric)  # whatever family the version is
        return [(float(s), m) for s, m in zip(scores, missing, strict=True)]

    async def _loaded(self, deadline: float) -> Deployed | None:
        """The models once loaded, waiting until ``deadline`` (perf_counter) for a worker that
        is starting; None at once when loading failed for a reason that waiting cannot fix."""
        while self.deployed is None and self.problem_heals and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        return self.deployed

    def _remember(self, request_ids: list[str]) -> None:
        if CONFIG.feedback_memory <= 0:
            return
        with self._recent_lock:
            for request_id in request_ids:
                self.recent[request_id] = None
            while len(self.recent) > CONFIG.feedback_memory:
                self.recent.popitem(last=False)

    @bentoml.api(route="/predict")
    async def predict(
        self,
        records: Annotated[list[Record], Field(min_length=1, max_length=CONFIG.max_records)],  # type: ignore[valid-type]
        routing_key: Annotated[str | None, Field(max_length=256)] = None,
    ) -> PredictResponse:
        """Score records. Each record is routed by ``routing_key`` (or its routing field, or a
        random key) to the champion or, for the configured share of keys, the challenger."""
        started = time.perf_counter()
        deployed = self.deployed or await self._loaded(started + CONFIG.ready_wait_s)
        if deployed is None:
            self.metrics.errors.labels(kind="not_ready").inc()
            # Not the problem's text: it may name internal hosts; /admin/models and the log have it.
            why = ("the models are still loading" if self.problem_heals
                   else "the models could not be loaded (see /admin/models or the service log)")
            return cast(PredictResponse, JSONResponse(
                {"error": f"not ready: {why}"}, status_code=503, headers={"Retry-After": "5"}))
        # The fields sent, no nulls for those left out: the transform reads each with .get, the log keeps them.
        rows: list[dict[str, Any]] = [cast(Any, r).model_dump(exclude_unset=True) for r in records]
        plan = []
        share, _ = self.routing_share(deployed)
        for row in rows:
            key = routing_key or (str(row.get(CONFIG.routing_field)) if CONFIG.routing_field
                                  and row.get(CONFIG.routing_field) is not None else None)
            variant, used = route(key, share, deployed.challenger is not None)
            plan.append((variant, used))
        by_variant: dict[str, list[int]] = {}
        for index, (variant, _) in enumerate(plan):
            by_variant.setdefault(variant, []).append(index)
        models = {"champion": deployed.champion, "challenger": deployed.challenger}
        results: dict[int, tuple[float, list[str]]] = {}
        for name, indices in by_variant.items():
            try:
                scored = await self.batcher.submit(models[name], [rows[i] for i in indices])
            except Exception as exc:  # noqa: BLE001 - a failing challenger must not fail the request
                challenger = models["challenger"]
                if name != "challenger" or challenger is None:
                    raise
                # Counted against the challenger (a rollout's analysis reads it) and answered by the
                # champion, as the champion would have answered without a test.
                self.metrics.variant_errors.labels(variant=name, model_version=challenger.version).inc(len(indices))
                log.warning("challenger v%s failed on %d records (the champion answered): %s: %s",
                            challenger.version, len(indices), type(exc).__name__, exc)
                scored = await self.batcher.submit(deployed.champion, [rows[i] for i in indices])
                for i in indices:
                    plan[i] = ("champion", plan[i][1])
            results.update(zip(indices, scored, strict=True))
        unscorable = [i for i, (score, _) in sorted(results.items()) if not math.isfinite(score)]
        if unscorable:
            self.metrics.errors.labels(kind="unscorable").inc()
            raise bentoml.exceptions.InvalidArgument(
                f"records {unscorable}: values too far outside the training data for the model to score "
                "(the score is not a finite number)")
        latency = time.perf_counter() - started
        now = datetime.now(UTC)
        predictions, log_rows = [], []
        for index, row in enumerate(rows):
            variant, key = plan[index]
            model = models[variant] or deployed.champion  # route() picks the challenger only when set
            score, missing = results[index]
            decision = score >= threshold(model) if CONTRACT.task == "classification" else None
            request_id = uuid.uuid4().hex
            predictions.append(Prediction(request_id=request_id, score=score, decision=decision, variant=variant,
                                          model_name=model.name, model_version=model.version,
                                          missing_lookups=missing, ignored_fields=sorted(row.keys() - SCORED)))
            log_rows.append(self._log_row(request_id, now, key, variant, True, model, row, score, decision,
                                          missing, latency))
            self.metrics.observe(variant, model.version, score, latency / len(rows))
        self.logbook.add("predictions", log_rows)
        self.metrics.log_backlog.set(self.logbook.backlog)
        self._remember([p.request_id for p in predictions])
        self.metrics.requests.labels(endpoint="predict").inc()
        if CONFIG.shadow and deployed.challenger is not None and "champion" in by_variant:
            # The challenger scores the champion's records too; the response does not wait.
            champion_rows = [(predictions[i].request_id, plan[i][1], rows[i]) for i in by_variant["champion"]]
            asyncio.get_running_loop().create_task(self._shadow(deployed.challenger, champion_rows, now))
        return PredictResponse(predictions=predictions)

    async def _shadow(self, model: LoadedVersion, items: list[tuple[str, str, dict[str, Any]]],
                      now: datetime) -> None:
        started = time.perf_counter()
        try:
            scored = await self.batcher.submit(model, [row for _, _, row in items])
        except Exception as exc:  # noqa: BLE001 - a shadow failure never reaches a client
            self.metrics.errors.labels(kind="shadow").inc()
            log.warning("shadow scoring by %s v%s failed: %s", model.name, model.version, exc)
            return
        latency = time.perf_counter() - started
        rows = []
        for (request_id, key, row), (score, missing) in zip(items, scored, strict=True):
            decision = score >= threshold(model) if CONTRACT.task == "classification" else None
            rows.append(self._log_row(request_id, now, key, "challenger", False, model, row, score, decision,
                                      missing, latency))
            self.metrics.shadow.labels(model_version=model.version).inc()
        self.logbook.add("predictions", rows)

    @staticmethod
    def _log_row(request_id: str, now: datetime, key: str, variant: str, served: bool, model: LoadedVersion,
                 row: dict[str, Any], score: float, decision: bool | None, missing: list[str],
                 latency: float) -> dict[str, Any]:
        return {"request_id": request_id, "ts": now, "routing_key": key, "variant": variant, "served": served,
                "model_name": model.name, "model_version": model.version,
                "feature_version": model.tags.get(Lineage.tag("feature_version")),  # as recorded: text
                "inputs": json.dumps(row, default=str, sort_keys=True), "score": score, "decision": decision,
                "missing_lookups": ",".join(missing), "latency_s": latency}

    @bentoml.api(route="/feedback")
    async def feedback(
        self, items: Annotated[list[FeedbackItem], Field(min_length=1, max_length=CONFIG.max_records)],
    ) -> FeedbackResponse:
        """Record ground truth (e.g. the actual arr_delay) for earlier request ids. Ids no
        prediction was logged for are returned, not recorded."""
        ids = [item.request_id for item in items]
        with self._recent_lock:
            unknown = [i for i in ids if i not in self.recent]
        if unknown:
            unknown = await asyncio.to_thread(self._not_logged, unknown)
        now = datetime.now(UTC)
        accepted = [{"request_id": item.request_id, "ts": now, "actual": item.actual}
                    for item in items if item.request_id not in set(unknown)]
        self.logbook.add("feedback", accepted)
        self.metrics.feedback.inc(len(accepted))
        if unknown:
            self.metrics.errors.labels(kind="unknown_request_id").inc(len(unknown))
        self.metrics.requests.labels(endpoint="feedback").inc()
        return FeedbackResponse(accepted=len(accepted), unknown_request_ids=unknown)

    def _not_logged(self, ids: list[str]) -> list[str]:
        """Of ``ids``, those neither buffered here, nor in the journal (a sibling worker's
        answer not yet committed), nor in the prediction log: in that order, as rows move from
        the journal to the log."""
        import pyarrow as pa
        import pyarrow.compute as pc

        from core.lake import read_arrow

        buffered = self.logbook.buffered("predictions", "request_id")
        left = [i for i in ids if i not in buffered]
        if left:
            journaled = self.logbook.journaled("predictions", "request_id", set(left))
            left = [i for i in left if i not in journaled]
        uri = self.logbook.uri("predictions")
        if not left or not self.lake.exists(uri):
            return left
        logged = read_arrow(self.lake.table(uri), ["request_id"]).column("request_id")
        found = set(logged.filter(pc.is_in(logged, value_set=pa.array(left))).to_pylist())
        return [i for i in left if i not in found]

    @bentoml.on_shutdown
    def close(self) -> None:
        """Graceful shutdown: stop refreshing and write every buffered log row."""
        self._stop.set()
        left = self.logbook.close()
        log.info("prediction log flushed (%d rows left unwritten)", left)


cast(Any, Flywheel).add_asgi_middleware(CloseWhenDraining)
cast(Any, Flywheel).add_asgi_middleware(ErrorShape)  # outermost of ours: every refusal below is shaped
cast(Any, Flywheel).add_asgi_middleware(JsonOnly, paths=("/predict", "/feedback"))
cast(Any, Flywheel).add_asgi_middleware(BodyLimit, max_bytes=CONFIG.max_body_bytes)
