"""Replay work: 2013 flights as live traffic, in time order, at an accelerated clock.

A replayed day is cut into its 24 scheduled-departure hours. In each hour the flights due to
leave are scored by the service (``POST /predict``, with the weather at their origin in the
request, as a client knows it at departure), and the flights that have landed by the end of
that hour report their ground truth (``POST /feedback`` with the real ``arr_delay``). When the
day is over, its completed flights and its weather land as one file per table in the landing
folder the demo contract reads (``<landing>/<table>/<date>.csv``), written under a temporary
name and renamed, so an ingest never reads half a file.

A flight lands ``dep_delay`` after its scheduled departure plus its ``air_time`` and 20
minutes of taxiing (the data has no taxi times); cancelled flights (no ``arr_delay``) send no
feedback. The record fields sent are the ones the service's OpenAPI schema asks for.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import requests
from prefect import task
from prefect.cache_policies import NO_CACHE

from core.contract import DatasetContract, StreamSource
from core.sources import make_source

log = logging.getLogger(__name__)

TAXI_MINUTES = 20
RECORDS_PER_REQUEST = 50


@dataclass
class Season:
    """The flights and weather of the replayed period, with what the replay derives."""

    flights: pd.DataFrame  # + _departs (scheduled departure hour), _lands (estimated landing), _day
    weather: pd.DataFrame  # + _day

    def days(self, start: date, end: date) -> Iterator[date]:
        day = start
        while day <= end:
            yield day
            day += timedelta(days=1)


def load_season(source_contract: DatasetContract) -> Season:
    """Flights and weather as the source contract (``flights``) reads them."""
    flights = make_source("flights", source_contract.tables["flights"]).read()
    weather = make_source("weather", source_contract.tables["weather"]).read()
    departs = pd.to_datetime(flights["time_hour"])
    flights["_departs"] = departs
    flights["_day"] = departs.dt.date
    scheduled = departs + pd.to_timedelta(flights["minute"], unit="min")
    flights["_lands"] = (scheduled + pd.to_timedelta(flights["dep_delay"], unit="min")
                         + pd.to_timedelta(flights["air_time"] + TAXI_MINUTES, unit="min"))
    weather["_day"] = pd.to_datetime(weather["time_hour"]).dt.date
    order = np.argsort(flights["_departs"].to_numpy(), kind="stable")
    return Season(flights.iloc[order].reset_index(drop=True), weather)


def land_days(season: Season, days: list[date], landing: Path, stream: StreamSource | None = None) -> int:
    """Each day's completed flights and weather as ``<landing>/<table>/<day>.csv``; returns
    the flights rows landed. Rewriting a day already landed gives the same file.

    With ``stream`` (a stream-fed flights table, ``make demo --live``), the day's flights are
    published to it instead, one message per flight, and ``<landing>/flights/<day>.published``
    records it: a day is published once, however often it is landed."""
    raw_columns = {"flights": [c for c in season.flights.columns if not c.startswith("_")],
                   "weather": [c for c in season.weather.columns if not c.startswith("_")]}
    rows = 0
    for table, frame in (("flights", season.flights), ("weather", season.weather)):
        folder = landing / table
        folder.mkdir(parents=True, exist_ok=True)
        chosen = frame[frame["_day"].isin(days)]
        for day, part in chosen.groupby("_day", sort=True):
            if table == "flights" and stream is not None:
                from core.stream import publish

                marker = folder / f"{day}.published"
                if not marker.exists():
                    publish(stream.url, stream.stream, part[raw_columns[table]].reset_index(drop=True))
                    marker.write_text(f"{len(part)}\n")
                rows += len(part)
                continue
            target = folder / f"{day}.csv"
            tmp = folder / f".{day}.csv.partial"
            part[raw_columns[table]].to_csv(tmp, index=False)
            os.replace(tmp, target)
            if table == "flights":
                rows += len(part)
    return rows


def record_fields(service_url: str, timeout: float = 10.0) -> list[str]:
    """The fields of one /predict record, from the service's OpenAPI document."""
    spec = requests.get(f"{service_url}/docs.json", timeout=timeout).json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    schemas = spec["components"]["schemas"]
    if "$ref" in body:
        body = schemas[body["$ref"].rsplit("/", 1)[-1]]
    items = body["properties"]["records"]["items"]
    record = schemas[items["$ref"].rsplit("/", 1)[-1]] if "$ref" in items else items
    return list(record["properties"])


def _records(frame: pd.DataFrame, fields: list[str]) -> list[dict[str, Any]]:
    present = [f for f in fields if f in frame.columns]
    part = frame[present].astype(object).where(frame[present].notna(), None)
    return part.to_dict("records")


@dataclass
class DayStats:
    day: str
    sent: int = 0
    feedback: int = 0
    errors: int = 0
    by_version: dict[str, int] = field(default_factory=dict)
    first_seen: dict[str, float] = field(default_factory=dict)  # "variant vN" -> wall time first answered
    sent_marks: list[tuple[float, int]] = field(default_factory=list)  # (wall time, records sent so far today)
    behind_s: float = 0.0


class Client:
    """A small pool of HTTP sessions sending the replay's requests."""

    def __init__(self, url: str, workers: int = 4, timeout: float = 30.0):
        self.url, self.timeout = url.rstrip("/"), timeout
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="replay")
        self.local = threading.local()

    def _session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        return self.local.session

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        for attempt in range(3):
            try:
                response = self._session().post(self.url + path, json=body, timeout=self.timeout)
            except requests.RequestException as exc:
                log.warning("%s failed (%s), retrying", path, exc)
                time.sleep(1 + attempt)
                continue
            if response.status_code in (429, 503):
                time.sleep(0.5 + attempt)
                continue
            if response.status_code >= 400:
                log.warning("%s answered %d: %s", path, response.status_code, response.text[:300])
                return None
            return response.json()
        return None

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def replay_day(client: Client, season: Season, day: date, fields: list[str], target: str,
               seconds_per_day: float, awaiting: dict[str, tuple[pd.Timestamp, float]]) -> DayStats:
    """Score the day's flights hour by hour and send the feedback of those that landed.
    ``awaiting`` (request id -> (landing time, actual)) carries flights still in the air
    across days."""
    stats = DayStats(day=str(day))
    flights = season.flights[season.flights["_day"] == day]
    weather = season.weather[season.weather["_day"] == day].drop(columns=["_day"])
    joined = flights.merge(weather.drop(columns=[c for c in ("year", "month", "day", "hour") if c in weather]),
                           on=["origin", "time_hour"], how="left", suffixes=("", "_weather"))
    hours = joined["_departs"].dt.hour
    lock = threading.Lock()
    started = time.monotonic()
    for hour in range(24):
        due = started + seconds_per_day * hour / 24
        wait = due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        else:
            stats.behind_s = max(stats.behind_s, -wait)
        leaving = joined[hours == hour]
        chunks = [leaving.iloc[i:i + RECORDS_PER_REQUEST] for i in range(0, len(leaving), RECORDS_PER_REQUEST)]

        def send(chunk: pd.DataFrame) -> None:
            answer = client.post("/predict", {"records": _records(chunk, fields)})
            now = time.time()
            with lock:
                if answer is None:
                    stats.errors += len(chunk)
                    return
                for prediction, (_, flight) in zip(answer["predictions"], chunk.iterrows(), strict=True):
                    key = f"{prediction['variant']} v{prediction['model_version']}"
                    stats.by_version[key] = stats.by_version.get(key, 0) + 1
                    stats.first_seen.setdefault(key, now)
                    if pd.notna(flight[target]) and pd.notna(flight["_lands"]):
                        awaiting[prediction["request_id"]] = (flight["_lands"], float(flight[target]))
                stats.sent += len(chunk)

        list(client.pool.map(send, chunks))
        stats.sent_marks.append((time.time(), stats.sent))
        clock = pd.Timestamp(day, tz="UTC") + pd.Timedelta(hours=hour + 1)
        landed = [(rid, actual) for rid, (lands, actual) in awaiting.items() if lands <= clock]
        for rid, _ in landed:
            del awaiting[rid]
        batches = [landed[i:i + 500] for i in range(0, len(landed), 500)]

        def report(batch: list[tuple[str, float]]) -> None:
            answer = client.post("/feedback", {"items": [{"request_id": r, "actual": a} for r, a in batch]})
            with lock:
                stats.feedback += answer["accepted"] if answer else 0

        list(client.pool.map(report, batches))
    return stats


land_task = task(name="land the day's files", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=1)(land_days)
replay_day_task = task(name="replay a day", cache_policy=NO_CACHE, task_run_name="replay {day}")(replay_day)
