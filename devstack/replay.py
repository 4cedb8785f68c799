"""``python -m devstack.replay``: replay 2013 flights day by day as live traffic at an accelerated
clock: predictions from the service, ground truth as feedback after each flight lands, and
each finished day's flights and weather landing as files the scheduled ingest picks up
(or, for a contract whose flights are stream-fed, ``flights_live``, the day's flights
published to that stream for ``flows.stream``).

    python -m devstack.replay --start 2013-04-01 --end 2013-04-30 --seconds-per-day 4

``--land-only`` lands the days' files without traffic (the demo's January-March history).
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field, model_validator

from core.contract import StreamSource, load_contract
from core.settings import get_settings
from flows._runtime import main, run_started


class ReplayParams(BaseModel):
    """Replay days of flights as live traffic to the service, with feedback and daily files."""

    start: date = Field(date(2013, 4, 1), description="First day replayed.")
    end: date = Field(date(2013, 9, 30), description="Last day replayed.")
    seconds_per_day: float = Field(4.0, gt=0, description="Wall seconds one replayed day takes (at least).")
    source: str = Field("flights", description="Contract whose flights and weather sources are replayed.")
    dataset: str = Field("flights_demo", description="Contract of the landing folder (its flights source's folder).")
    service_url: str | None = Field(None, description="The service (default: http://<serving.host>:<serving.port>).")
    land_only: bool = Field(False, description="Land the days' files without sending traffic.")
    workers: int = Field(4, ge=1, le=32, description="Concurrent HTTP requests.")

    @model_validator(mode="after")
    def _ordered(self) -> ReplayParams:
        if self.end < self.start:
            raise ValueError(f"end {self.end} is before start {self.start}")
        return self


class ReplayResult(BaseModel):
    days: int
    sent: int
    feedback: int
    errors: int
    landed_rows: int
    by_version: dict[str, int]
    first_seen: dict[str, float] = Field(description="'variant vN' -> wall time it first answered a request.")
    sent_marks: list[tuple[float, int]] = Field(description="(wall time, records sent so far), each replayed hour.")
    behind_s: float = Field(description="Most the replay fell behind its clock.")
    landing: str

    def then(self, later: ReplayResult) -> ReplayResult:
        """This replay followed by ``later``, the days after it into the same landing folder."""
        by_version = dict(self.by_version)
        for key, count in later.by_version.items():
            by_version[key] = by_version.get(key, 0) + count
        return ReplayResult(days=self.days + later.days, sent=self.sent + later.sent,
                            feedback=self.feedback + later.feedback, errors=self.errors + later.errors,
                            landed_rows=self.landed_rows + later.landed_rows, by_version=by_version,
                            first_seen={**later.first_seen, **self.first_seen},
                            sent_marks=self.sent_marks + [(t, self.sent + n) for t, n in later.sent_marks],
                            behind_s=max(self.behind_s, later.behind_s), landing=later.landing)


def landing_folder(dataset: str) -> Path:
    """The folder the contract's daily-file globs read (``.../landing/weather/*.csv`` ->
    ``.../landing``): flights' when they land as files, else weather's."""
    from core.sources import resolve_path

    contract = load_contract(dataset)
    for table in ("flights", "weather"):
        pattern = getattr(contract.tables[table].source, "path", "")
        if "*" in pattern:
            return Path(resolve_path(pattern)).parent.parent
    raise ValueError(f"contract {dataset!r}: neither flights nor weather is a folder of landed files")


def flights_stream(dataset: str) -> StreamSource | None:
    """The stream that feeds the contract's flights table (None: flights land as files)."""
    source = load_contract(dataset).tables["flights"].source
    return source if isinstance(source, StreamSource) else None


@flow(name="replay", log_prints=True)
def replay(params: ReplayParams = ReplayParams()) -> ReplayResult:
    """Land or replay the days from ``start`` to ``end``; each day is a task run."""
    from devstack.traffic import Client, land_task, load_season, record_fields, replay_day_task

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    landing = landing_folder(params.dataset)
    stream = flights_stream(params.dataset)
    source = load_contract(params.source)
    season = load_season(source)
    days = list(season.days(params.start, params.end))
    if params.land_only:
        rows = land_task(season, days, landing, stream)
        logger.info("landed %d days (%s rows of flights) in %s%s", len(days), f"{rows:,}", landing,
                    f"; flights published to the stream {stream.stream}" if stream else "")
        return ReplayResult(days=len(days), sent=0, feedback=0, errors=0, landed_rows=rows, by_version={},
                            first_seen={}, sent_marks=[], behind_s=0.0, landing=str(landing))

    url = params.service_url or f"http://{settings.serving.host}:{settings.serving.port}"
    fields = record_fields(url)
    client = Client(url, workers=params.workers)
    awaiting: dict[str, Any] = {}
    total: dict[str, Any] = {"sent": 0, "feedback": 0, "errors": 0, "landed": 0, "behind": 0.0}
    by_version: dict[str, int] = {}
    first_seen: dict[str, float] = {}
    marks: list[tuple[float, int]] = []
    target = source.target.column
    try:
        for day in days:
            stats = replay_day_task(client, season, day, fields, target, params.seconds_per_day, awaiting)
            total["landed"] += land_task(season, [day], landing, stream)
            for key, count in stats.by_version.items():
                by_version[key] = by_version.get(key, 0) + count
            for key, seen in stats.first_seen.items():
                first_seen.setdefault(key, seen)
            marks.extend((t, total["sent"] + n) for t, n in stats.sent_marks)
            total["sent"] += stats.sent
            total["feedback"] += stats.feedback
            total["errors"] += stats.errors
            total["behind"] = max(total["behind"], stats.behind_s)
            logger.info("%s: %d flights scored (%s), %d feedback, %d errors%s", day, stats.sent,
                        ", ".join(f"{k} {v}" for k, v in sorted(stats.by_version.items())), stats.feedback,
                        stats.errors, f", {stats.behind_s:.1f} s behind the clock" if stats.behind_s > 1 else "")
    finally:
        client.close()
    return ReplayResult(days=len(days), sent=total["sent"], feedback=total["feedback"], errors=total["errors"],
                        landed_rows=total["landed"], by_version=by_version, first_seen=first_seen,
                        sent_marks=marks, behind_s=total["behind"], landing=str(landing))


def report(result: ReplayResult) -> None:
    print(f"replayed {result.days} days: {result.sent:,} flights scored, {result.feedback:,} feedback, "
          f"{result.errors} errors; {result.landed_rows:,} rows landed in {result.landing}")
    for key, count in sorted(result.by_version.items()):
        print(f"  {key}: {count:,} ({time.strftime('%H:%M:%S', time.localtime(result.first_seen[key]))} first)")


if __name__ == "__main__":
    sys.exit(main(replay, ReplayParams, sys.argv[1:], "python -m devstack.replay", report))
