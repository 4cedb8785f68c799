"""``make demo``: the closed loop on real 2013 data, with no hand on the keyboard.

1. Uses the stack ``make up`` started (or starts one, and stops it at the end).
2. Lands January-March 2013 as daily files and runs the ``train`` deployment on them
   (dataset ``flights_demo``); the ``serve-registered`` automation starts the service.
3. Gives the ingest, monitor and evaluate deployments demo-paced schedules (each a schedule
   with its own parameters, visible in the Prefect UI, removed at the end).
4. Replays April-September as live traffic at an accelerated clock (``devstack.replay``): the
   service scores each flight, ground truth follows each landing, each day lands as files.
5. Watches the Prefect events and runs and prints the timeline as it happens: drift detected,
   retrain started, challenger registered and serving, A/B decisions, promotion. At the end:
   two reaction times, measured from the moment drifted data had arrived (the replay had sent
   the monitor's minimum window of post-training traffic): to the retrain run starting, and
   to the new challenger answering a request. Written to ``<home>/demo/timeline.json`` and a
   Prefect artifact.

If the loop has not closed by the last replayed day (a retrain that finished late has had
too little traffic for its A/B), the replay goes on a few days at a time, up to
``--overtime-days`` more.

``--smoke`` (CI): a stack of its own on free ports, a small training budget, April, replayed
a few days at a time and stopped as soon as the loop has closed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any

import requests

from core import events

if TYPE_CHECKING:
    from collections.abc import Callable

    from devstack.replay import ReplayParams, ReplayResult

DATASET = "flights_demo"
LIVE_DATASET = "flights_live"  # --live: flights from a Redis stream (flows.stream), weather as files
INITIAL_ATTEMPTS = 3
# The first model: one trial of each family (4 epochs or blocks of boosting rounds); the
# competition's winner has to beat the prior rate, which every family does on January-March.
# Retrains use the worker's settings, as the automation would anywhere.
INITIAL_BUDGET = {"trials": 1, "max_epochs": 4}
# After --end, the replay goes on CHUNK_DAYS days at a time while the loop has not closed,
# up to the last day of the 2013 data.
CHUNK_DAYS = 3
LAST_DAY = date(2013, 12, 31)
SMOKE_TRAIN = '{"trials": 1, "max_epochs": 4, "grace_period": 1, "num_workers": 1}'


@dataclass
class Pace:
    seconds_per_day: float
    monitor_s: int
    evaluate_s: int
    ingest_s: int
    window_rows: int
    drift_share: float
    ab_min_rows: int
    challenger_share: float
    # The retrain guardrails (the triggers' `within` window and the monitor's event cool-down,
    # 15 minutes at a production pace) scaled to the demo's clock: a retrain that did not pass
    # the gate is followed by another within this long, not after the demo has ended.
    guardrail_s: int = 60


@dataclass
class Timeline:
    started: float = field(default_factory=time.time)
    entries: list[dict[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, at: float, what: str, detail: str = "", **data: Any) -> None:
        with self.lock:
            self.entries.append({"at": at, "elapsed_s": round(at - self.started, 1), "what": what,
                                 "detail": detail, **data})
        print(f"  +{_clock(at - self.started)}  {what}{': ' + detail if detail else ''}", flush=True)

    def first(self, what: str, after: float = 0.0) -> dict[str, Any] | None:
        with self.lock:
            found = [e for e in self.entries if e["what"] == what and e["at"] >= after]
        return min(found, key=lambda e: e["at"]) if found else None


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 60:02d}:{seconds % 60:02d}"


def _iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat()


def _stamp(text: str | None) -> float | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() if text else None


class Watcher(threading.Thread):
    """Polls the Prefect API for Flywheel events and train runs; adds them to the timeline."""

    def __init__(self, api: str, model_name: str, timeline: Timeline, train_deployment: str):
        super().__init__(daemon=True, name="demo-watcher")
        self.api, self.model_name, self.timeline = api, model_name, timeline
        self.train_deployment = train_deployment
        self.seen: set[str] = set()
        self.runs: set[tuple[str, str]] = set()
        self.stopping = threading.Event()
        self.since = timeline.started - 5

    def run(self) -> None:
        failures = 0
        while not self.stopping.wait(2.0):
            try:
                self.poll()
                failures = 0
            except requests.RequestException as exc:
                failures += 1
                if failures == 5:
                    print(f"  (cannot read the Prefect API's events: {exc})", file=sys.stderr, flush=True)

    def poll(self) -> None:
        body: dict[str, Any] = {"filter": {"occurred": {"since": _iso(self.since - 1)},
                           "event": {"prefix": ["flywheel."]},
                           "any_resource": {"id": [f"flywheel.model.{self.model_name}"]}},
                "limit": 50}
        response = requests.post(f"{self.api}/events/filter", json=body, timeout=10)
        response.raise_for_status()
        events = response.json()["events"]
        for event in sorted(events, key=lambda e: e["occurred"]):
            if event["id"] in self.seen:
                continue
            self.seen.add(event["id"])
            self.since = max(self.since, _stamp(event["occurred"]) or self.since)
            self.timeline.add(_stamp(event["occurred"]) or time.time(), event["event"].removeprefix("flywheel."),
                              _describe(event["event"], event.get("payload", {})), payload=event.get("payload", {}),
                              related=[r.get("prefect.resource.id") for r in event.get("related", [])])
        response = requests.post(f"{self.api}/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [self.train_deployment]},
                          "start_time": {"after_": _iso(self.timeline.started - 5)}},
            "limit": 50}, timeout=10)
        response.raise_for_status()
        runs = response.json()
        for run in runs:
            state = run["state"]["type"] if run.get("state") else "UNKNOWN"
            if (run["id"], state) in self.runs:
                continue
            self.runs.add((run["id"], state))
            if state == "RUNNING":
                self.timeline.add(_stamp(run["start_time"]) or time.time(), "train run started", run["name"],
                                  run_id=run["id"], automated=not run.get("auto_scheduled"))
            elif state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                self.timeline.add(_stamp(run.get("end_time")) or time.time(), f"train run {state.lower()}", run["name"],
                                  run_id=run["id"])


def _describe(name: str, payload: dict[str, Any]) -> str:
    if name == events.DRIFT_DETECTED:
        top = sorted(payload.get("scores", {}).items(), key=lambda kv: -kv[1])[:4]
        return (f"share {payload.get('share', 0):.2f} over {payload.get('live_rows')} live rows; "
                + ", ".join(f"{k} {v:.2f}" for k, v in top))
    if name == events.MODEL_REGISTERED:
        return f"version {payload.get('version')} as {', '.join(payload.get('aliases', []))}"
    if name == events.AB_DECIDED:
        return f"{payload.get('action')}: {payload.get('reason', '')}"[:200]
    if name in (events.MODEL_PROMOTED, events.MODEL_ROLLED_BACK):
        return f"champion v{payload.get('from_version')} -> v{payload.get('to_version')}"
    if name == events.PERFORMANCE_DEGRADED:
        return "; ".join(d.get("reason", "") for d in payload.get("degraded", []))[:200]
    return ""


async def _deployments() -> dict[str, Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return {d.name: d for d in await client.read_deployments()}


async def _add_schedules(pace: Pace, dataset: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentScheduleCreate
    from prefect.client.schemas.schedules import IntervalSchedule

    deployments = await _deployments()
    plan = {
        "ingest-daily": (pace.ingest_s, {"dataset": dataset}),
        "monitor": (pace.monitor_s, {"dataset": dataset, "window_rows": pace.window_rows,
                                     "drift_share": pace.drift_share, "cooldown_s": pace.guardrail_s}),
        "evaluate-hourly": (pace.evaluate_s, {"dataset": dataset, "min_rows": pace.ab_min_rows}),
    }
    async with get_client() as client:
        for name, (seconds, params) in plan.items():
            await client.create_deployment_schedules(deployments[name].id, [DeploymentScheduleCreate(
                schedule=IntervalSchedule(interval=timedelta(seconds=seconds)), active=True,
                parameters={"params": params}, slug=f"demo-{name}")])


async def _scale_guardrails(within_s: int | None, saved: dict[str, int] | None = None) -> dict[str, int]:
    """Set the `within` window of the train deployment's event triggers (its automations) to
    ``within_s``, returning each one's previous window; with ``saved``, put those back."""
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore, EventTrigger

    deployments = await _deployments()
    previous: dict[str, int] = {}
    async with get_client() as client:
        owned = await client.read_resource_related_automations(f"prefect.deployment.{deployments['train'].id}")
        for automation in owned:
            trigger = automation.trigger
            if not isinstance(trigger, EventTrigger):
                continue
            key = str(automation.id)
            target = saved.get(key) if saved is not None else within_s
            if target is None:
                continue
            previous[key] = int(trigger.within.total_seconds())
            # The owner (the deployment) is not part of an update: the server keeps it.
            core = AutomationCore.model_validate(automation.model_dump(
                include=set(AutomationCore.model_fields) - {"owner_resource"}))
            core.trigger = trigger.model_copy(update={"within": timedelta(seconds=target)})
            await client.update_automation(automation.id, core)
    return previous


async def _remove_schedules(dataset: str) -> int:
    """Delete the demo's schedules and the runs they scheduled that have not started."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterDeploymentId,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    removed = 0
    async with get_client() as client:
        for deployment in (await _deployments()).values():
            for schedule in await client.read_deployment_schedules(deployment.id):
                if (schedule.slug or "").startswith("demo-"):
                    await client.delete_deployment_schedule(deployment.id, schedule.id)
                    removed += 1
            pending = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
                deployment_id=FlowRunFilterDeploymentId(any_=[deployment.id]),
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
            for run in pending:
                if (run.parameters.get("params") or {}).get("dataset") == dataset:
                    await client.delete_flow_run(run.id)
    return removed


async def _run_and_wait(name: str, parameters: dict[str, Any], timeout_s: float) -> Any:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    run = await run_deployment(name, parameters=parameters, timeout=0)  # type: ignore[misc]
    deadline = time.monotonic() + timeout_s
    async with get_client() as client:
        while time.monotonic() < deadline:
            run = await client.read_flow_run(run.id)
            if run.state is not None and run.state.is_final():
                return run
            await asyncio.sleep(2)
    raise TimeoutError(f"{name} run {run.name} did not finish in {timeout_s:.0f} s (state {run.state})")


async def _start_run(name: str, parameters: dict[str, Any]) -> Any:
    from prefect.deployments import run_deployment

    return await run_deployment(name, parameters=parameters, timeout=0)  # type: ignore[misc]


async def _cancel_run(run_id: Any) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        if run.state is not None and not run.state.is_final():
            await client.set_flow_run_state(run_id, Cancelling(message="the demo is over"), force=True)


def _wait_stream_drained(source: Any, timeout_s: float) -> int:
    """Until the stream's consumer group has every message delivered and acknowledged (the
    consumer acknowledges after the lake commit); returns the stream's length."""
    import redis

    from core.contract import expand

    client = redis.Redis.from_url(expand(source.url), decode_responses=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        groups = {g["name"]: g for g in client.xinfo_groups(source.stream)}
        group = groups.get(source.group)
        if group is not None and group.get("lag") == 0 and group.get("pending") == 0:
            return int(client.xlen(source.stream))
        time.sleep(1)
    raise TimeoutError(f"the stream consumer did not take every message of {source.stream} in {timeout_s:.0f} s "
                       f"(see the stream run's logs in the Prefect UI)")


def _wait_service(settings: Any, model_name: str, timeout_s: float) -> Any:
    from serving.control import is_ours, probe, read_state

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        served = read_state(settings, model_name)
        if served is not None and is_ours(served) and probe(served) == 200:
            return served
        time.sleep(1)
    raise TimeoutError(f"the serve-registered automation did not start {model_name}'s service in {timeout_s:.0f} s "
                       f"(see the worker log under {settings.home / 'stack' / 'logs'})")


def decided_on_ground_truth(payload: dict[str, Any], min_rows: int, version: str | None = None) -> bool:
    """An A/B decision (``flywheel.ab.decided``) made with at least ``min_rows`` labelled
    predictions in each arm (a "not enough ground truth" answer is not one), about ``version``
    when given."""
    arms = [payload.get("champion") or {}, payload.get("challenger") or {}]
    return (all(int(arm.get("rows") or 0) >= min_rows and arm.get("value") is not None for arm in arms)
            and (version is None or version in {str(arm.get("model_version")) for arm in arms}))


def watch_prometheus_target(prometheus: str, model_name: str, timeline: Timeline, timeout_s: float = 120) -> None:
    """In the background: wait until the stack's Prometheus scrapes the service (found through
    the target file ``flows.deploy`` wrote) and put it on the timeline, with its scrape URL."""
    def look() -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                targets = requests.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
            except (requests.RequestException, ValueError, KeyError):
                targets = []
            for target in targets:
                if target["labels"].get("model") == model_name and target.get("health") == "up":
                    timeline.add(time.time(), "prometheus scrapes the service",
                                 f"{target['scrapeUrl']} (job {target['labels'].get('job')}, model {model_name})")
                    return
            time.sleep(2)
        timeline.add(time.time(), "prometheus target missing", f"{prometheus} lists no target for {model_name} "
                     f"after {timeout_s:.0f} s")

    threading.Thread(target=look, name="prometheus-target", daemon=True).start()


def reaction_times(timeline: Timeline, marks: list[tuple[float, int]], min_rows: int, first_seen: dict[str, float],
                   initial_version: str, ab_min_rows: int = 0) -> dict[str, Any]:
    """Drifted data arriving -> retrain started, -> the new challenger answering, -> the first
    A/B decision about it made on ground truth."""
    arrived = next((t for t, sent in marks if sent >= min_rows), None)
    out: dict[str, Any] = {"drifted_data_arrived_at": arrived}
    if arrived is None:
        return out
    drift = timeline.first("drift.detected", after=arrived - 60)
    retrain = timeline.first("train run started", after=drift["at"] - 5) if drift else None
    if retrain:
        finished = [e for e in timeline.entries if e["what"].startswith("train run ") and e["what"] != "train run started"
                    and e.get("run_id") == retrain.get("run_id")]
        by_it = [e for e in timeline.entries if e["what"] == "model.registered"
                 and f"prefect.flow-run.{retrain.get('run_id')}" in e.get("related", [])]
        out["retrain_outcome"] = ("registered" if by_it else "not registered (it did not pass the gate)"
                                  if finished and finished[0]["what"] == "train run completed"
                                  else finished[0]["what"] if finished else "still running")
    registered = [e for e in timeline.entries if e["what"] == "model.registered"
                  and str(e.get("payload", {}).get("version")) != initial_version]
    served = None
    if registered:
        version = str(min(registered, key=lambda e: e["at"])["payload"]["version"])
        served = first_seen.get(f"challenger v{version}") or first_seen.get(f"champion v{version}")
        out["challenger_version"] = version
    decided = None
    if served and registered:
        decided = next((e for e in sorted(timeline.entries, key=lambda e: e["at"])
                        if e["what"] == "ab.decided" and e["at"] >= served
                        and decided_on_ground_truth(e.get("payload", {}), ab_min_rows, out["challenger_version"])), None)
        out["ab_decision"] = (f"{decided['payload'].get('action')}: {decided['payload'].get('reason', '')}"
                              if decided else None)
    out["retrains"] = len([e for e in timeline.entries if e["what"] == "train run started" and e["at"] >= arrived - 5])
    out["drift_detected_s"] = round(drift["at"] - arrived, 1) if drift else None
    out["retrain_started_s"] = round(retrain["at"] - arrived, 1) if retrain else None
    out["challenger_serving_s"] = round(served - arrived, 1) if served else None
    out["ab_decided_s"] = round(decided["at"] - arrived, 1) if decided else None
    return out


def replay_spans(start: date, end: date, last: date, chunked: bool = False) -> list[tuple[date, date]]:
    """The replay's spans of days: ``start`` to ``end`` as one (or CHUNK_DAYS at a time when
    ``chunked``), then CHUNK_DAYS at a time up to ``last``."""
    spans: list[tuple[date, date]] = []
    day = start
    while day <= max(end, last):
        within = day <= end
        to = end if within and not chunked else day + timedelta(days=CHUNK_DAYS - 1)
        to = min(to, end if within else last)
        spans.append((day, to))
        day = to + timedelta(days=1)
    return spans


def replay_until_closed(first: ReplayParams, last: date, closed: Callable[[ReplayResult], bool], timeline: Timeline,
                        stop_when_closed: bool = False) -> tuple[ReplayResult, date]:
    """Replays ``first``; then, while the loop has not closed (``closed``), the next
    CHUNK_DAYS days at a time, up to ``last``: a retrain that finished late still gets the
    traffic its A/B needs. With ``stop_when_closed`` (the smoke run), ``first`` is replayed in
    chunks too and the replay stops as soon as the loop has closed. Returns the whole replay
    and its last day."""
    from devstack.replay import replay

    spans = replay_spans(first.start, first.end, last, chunked=stop_when_closed)
    result: ReplayResult | None = None
    for start, to in spans:
        if start > first.end:
            timeline.add(time.time(), "replay extended", f"the loop has not closed: replaying {start} to {to}")
        part = replay(first.model_copy(update={"start": start, "end": to}))
        result = part if result is None else result.then(part)
        if (stop_when_closed or to >= first.end) and closed(result):
            return result, to
    assert result is not None
    return result, spans[-1][1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CI size: own stack on free ports, April, "
                        "stopped once the loop has closed")
    parser.add_argument("--start", type=date.fromisoformat, default=date(2013, 4, 1))
    parser.add_argument("--end", type=date.fromisoformat, default=None, help="last replayed day (default 2013-09-30; "
                        "smoke: 2013-04-30)")
    parser.add_argument("--seconds-per-day", type=float, default=None, help="wall seconds per replayed day "
                        "(default 4; smoke 5)")
    parser.add_argument("--overtime-days", type=int, default=30, help="days replayed past --end, "
                        f"{CHUNK_DAYS} at a time, while the loop has not closed (default 30)")
    parser.add_argument("--live", action="store_true", help="flights arrive on a Redis stream (dataset "
                        "flights_live, consumed by the stream deployment) instead of as daily files")
    parser.add_argument("--challenger-share", type=float, default=0.3,
                        help="share of routing keys the challenger gets during the demo (default 0.3)")
    args = parser.parse_args(argv)
    smoke = args.smoke
    dataset = LIVE_DATASET if args.live else DATASET
    pace = Pace(seconds_per_day=args.seconds_per_day or (5.0 if smoke else 4.0), monitor_s=20, evaluate_s=30 if smoke else 60,
                ingest_s=60, window_rows=5000, drift_share=0.25, ab_min_rows=100 if smoke else 300,
                challenger_share=args.challenger_share)
    end = args.end or (date(2013, 4, 30) if smoke else date(2013, 9, 30))

    from core.settings import configure, get_settings
    from devstack.stack import Ports, is_running, read_stack, up
    from devstack.stack import down as stack_down

    settings = get_settings()
    stack = read_stack(settings)
    own_stack = stack is None or not all(is_running(p) for p in stack.parts)
    if own_stack:
        print("no stack is up under this home: starting one (it stops at the end)", flush=True)
        os.environ["FLYWHEEL_HOME"] = str(settings.home.resolve())
        extra = {"FLYWHEEL_TRAIN": SMOKE_TRAIN} if smoke else {}
        # The serve-registered automation starts the service with the demo's share at once (a
        # stack that was already up keeps its own; the service is restarted with it below).
        extra["FLYWHEEL_SERVING__CHALLENGER_SHARE"] = str(pace.challenger_share)
        os.environ.update(extra)
        stack = up(settings, Ports.free() if smoke else Ports(), dataset, serve=False)
    assert stack is not None
    os.environ.update(stack.env())
    settings = configure()
    from flows._runtime import model_name_for

    model_name = model_name_for(dataset)
    timeline = Timeline()
    guardrails: dict[str, int] = {}
    failed = False
    consumer = None
    try:
        print(f"Prefect UI: http://127.0.0.1:{stack.ports.prefect}  (the demo's runs use dataset {dataset})", flush=True)
        from devstack.replay import ReplayParams, flights_stream, replay

        stream = flights_stream(dataset)
        if stream is not None:
            if "redis" in stack.skipped:
                raise RuntimeError(f"--live needs Redis: {stack.skipped['redis']}")
            consumer = asyncio.run(_start_run("stream/stream", {"params": {"dataset": dataset}}))
            timeline.add(time.time(), "stream consumer started", f"run {consumer.name} consumes {stream.stream} "
                         f"into the lake (micro-batches of up to {stream.batch_rows:,} rows, {stream.max_wait_ms} ms)")
        history = replay(ReplayParams(start=date(2013, 1, 1), end=args.start - timedelta(days=1), land_only=True,
                                      dataset=dataset))
        timeline.add(time.time(), "history landed" if stream is None else "history published",
                     f"{history.landed_rows:,} flights, 2013-01-01 to {args.start - timedelta(days=1)}")
        if stream is not None:
            length = _wait_stream_drained(stream, timeout_s=600)
            timeline.add(time.time(), "history in the lake", f"the consumer committed all {length:,} messages")
        deployments = asyncio.run(_deployments())
        watcher = Watcher(stack.prefect_api, model_name, timeline, str(deployments["train"].id))
        watcher.start()
        from core.registry import CHAMPION, Registry

        registry = Registry.for_uri(settings.tracking_uri)
        for attempt in range(1, INITIAL_ATTEMPTS + 1):
            # A run that does not pass the registration gate is run again, as a person would,
            # up to INITIAL_ATTEMPTS times.
            # Training is seeded, so a run again on the same data is the same model: each attempt
            # takes the next seed.
            seed = {} if attempt == 1 else {"seed": 13 + attempt - 1}
            run = asyncio.run(_run_and_wait("train/train", {"params": {"dataset": dataset, "refresh_data": attempt == 1,
                                                                       **INITIAL_BUDGET, **seed}}, timeout_s=1200))
            if not run.state.is_completed():
                raise RuntimeError(f"the initial training run {run.name} ended {run.state.type.value}; "
                                   f"see {settings.home / 'stack' / 'logs' / 'worker.log'}")
            if registry.exists(model_name) and registry.aliases(model_name).get(CHAMPION):
                break
            timeline.add(time.time(), "initial model not registered",
                         f"attempt {attempt}: it did not pass the gate (see the run {run.name} in the UI)")
        else:
            raise RuntimeError(f"no initial model passed the registration gate in {INITIAL_ATTEMPTS} runs")
        initial = str(registry.aliases(model_name).get(CHAMPION))
        served = _wait_service(settings, model_name, timeout_s=300)
        timeline.add(time.time(), "service up", f"{served.url} serving champion v{initial}")
        if abs(served.challenger_share - pace.challenger_share) > 1e-9:
            from flows.deploy import DeployParams, deploy

            deploy(DeployParams(action="serve", dataset=dataset, challenger_share=pace.challenger_share))
        if "prometheus" not in stack.skipped:
            watch_prometheus_target(f"http://127.0.0.1:{stack.ports.prometheus}", model_name, timeline)
        asyncio.run(_add_schedules(pace, dataset))
        guardrails = asyncio.run(_scale_guardrails(pace.guardrail_s))
        timeline.add(time.time(), "demo schedules on", f"ingest every {pace.ingest_s} s, monitor every "
                     f"{pace.monitor_s} s, evaluate every {pace.evaluate_s} s; retrain guardrails "
                     f"{pace.guardrail_s} s (the triggers' window and the monitor's cool-down)")
        def closed(so_far: ReplayResult) -> bool:
            watcher.poll()
            return reaction_times(timeline, so_far.sent_marks, settings.monitor.min_rows, so_far.first_seen, initial,
                                  pace.ab_min_rows).get("ab_decided_s") is not None

        last = min(end + timedelta(days=args.overtime_days), LAST_DAY)
        result, replayed_to = replay_until_closed(
            ReplayParams(start=args.start, end=end, seconds_per_day=pace.seconds_per_day, dataset=dataset,
                         service_url=served.url), last, closed, timeline, stop_when_closed=smoke)
        timeline.add(time.time(), "replay finished", f"{result.sent:,} flights scored to {replayed_to}, "
                     f"{result.feedback:,} feedback, {result.errors} errors; by version: {result.by_version}")
        time.sleep(4)
        watcher.poll()
        watcher.stopping.set()
        reactions = reaction_times(timeline, result.sent_marks, settings.monitor.min_rows, result.first_seen, initial,
                                   pace.ab_min_rows)
    except BaseException:
        failed = True
        raise
    finally:
        try:
            removed = asyncio.run(_remove_schedules(dataset))
            print(f"removed {removed} demo schedules", flush=True)
            if guardrails:
                asyncio.run(_scale_guardrails(None, guardrails))
                print(f"the train triggers' windows are back to {sorted(set(guardrails.values()))} s", flush=True)
            if consumer is not None:
                asyncio.run(_cancel_run(consumer.id))
                print(f"cancelled the stream consumer run {consumer.name}", flush=True)
        except Exception as exc:  # noqa: BLE001 - a stack already down has nothing to remove
            print(f"could not remove the demo schedules: {exc}", file=sys.stderr)
        # A failed full demo leaves its stack up for a look; a smoke run (CI) never leaves one.
        if own_stack and (smoke or not failed):
            print("stopping the stack the demo started: " + ", ".join(stack_down(settings)), flush=True)
        elif own_stack:
            print(f"the demo failed: its stack is left up for a look (logs in {settings.home / 'stack' / 'logs'}; "
                  "`make down` stops it)", flush=True)
    out = {"smoke": smoke, "live": args.live, "dataset": dataset, "pace": asdict(pace), "start": str(args.start),
           "end": str(end), "replayed_to": str(replayed_to), "reactions": reactions,
           "replay": result.model_dump(exclude={"sent_marks"}),
           "timeline": [{k: v for k, v in e.items() if k != "payload"} for e in timeline.entries]}
    path = settings.home / "demo" / "timeline.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1, default=str))
    print("\nReaction times, from drifted data arriving (the monitor's minimum window of post-training traffic sent):")
    for key, goal in (("retrain_started_s", 60), ("challenger_serving_s", 300), ("ab_decided_s", None)):
        value = reactions.get(key)
        shown = "not reached" if value is None else f"{value:.0f} s"
        print(f"  {key.removesuffix('_s').replace('_', ' '):<20} {shown:>12}   "
              + (f"(goal <= {goal} s)" if goal else f"(each arm >= {pace.ab_min_rows} labelled rows)"))
    print(f"timeline: {path}")
    print(f"  first retrain        {reactions.get('retrain_outcome') or 'none'} ({reactions.get('retrains', 0)} retrain "
          "run(s) after the drift)")
    if reactions.get("ab_decision"):
        print(f"  A/B decision         {reactions['ab_decision'][:160]}")
    # The loop closes when a retrained model serves as challenger and the A/B decides about it
    # on ground truth (promote, keep or drop: whichever the data says).
    if reactions.get("retrain_started_s") is None:
        print("the loop did not close: no retrain started after the drift", file=sys.stderr)
        return 1
    if reactions.get("challenger_serving_s") is None:
        print("the loop did not close: no retrained model " + ("was registered" if not reactions.get("challenger_version")
              else "served as challenger"), file=sys.stderr)
        return 1
    if reactions.get("ab_decided_s") is None:
        print(f"the loop did not close: no A/B decision on v{reactions['challenger_version']} with at least "
              f"{pace.ab_min_rows} labelled rows in each arm", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
