"""The private symbols our compat shims patch are where they were, in the versions we pin.

An upgrade that moves one fails here, in seconds, instead of as a hang or a leak in a slow
test (or for a user)."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest

from core.compat import untested

REPO = Path(__file__).resolve().parent.parent
SHIMS = {"core.compat.prefect": "prefect", "compute.ray_compat": "ray", "core.compat.torch": "torch",
         "core.compat.deltalake": "deltalake", "core.compat.bentoml": "bentoml"}


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_each_patched_symbol_is_where_the_shim_expects_it(name):
    shim = importlib.import_module(name)
    assert shim.moved() == []
    assert untested(SHIMS[name], shim.TESTED) is None


@pytest.mark.parametrize("name", sorted(SHIMS))
def test_pyproject_pins_the_range_each_shim_was_tested_on(name):
    """pyproject.toml pins what the shims were tested on (torch: the exact CPU build)."""
    shim = importlib.import_module(name)
    text = (REPO / "pyproject.toml").read_text()
    (line,) = re.findall(rf'^\s*"{SHIMS[name]}(?:\[[^\]]*\])?([<>=~!][^"]*)"', text, re.MULTILINE)
    low, high = shim.TESTED
    assert line in (f">={low},<{high}", f"=={low}.0"), f"{name}: pyproject says {line!r}, the shim was tested on {shim.TESTED}"


def test_importing_the_shims_changes_nothing_and_imports_no_library():
    """A patch is applied by an entry point calling it; an import alone must neither patch nor
    pull Ray, torch or Prefect into a process that does not need them (core/ imports none)."""
    code = ("import sys, core.compat.prefect, compute.ray_compat, core.compat.torch, core.compat.deltalake\n"
            "import core.compat.bentoml\n"
            "print(sorted(m for m in ('prefect', 'ray', 'torch', 'deltalake', 'bentoml') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_prefect_patches_apply_once_and_do_what_they_say():
    import subprocess as real_subprocess

    from prefect.client import base
    from prefect.server.api import server

    from core.compat import prefect

    assert prefect.retry_refused_connections() and prefect.retry_refused_connections()  # idempotent
    client = base.PrefectHttpxSyncClient(base_url="http://127.0.0.1:9")
    assert client._has_connected is True  # a refused connection is retried from the first call
    assert prefect.detach_temporary_server()
    assert server.subprocess is not real_subprocess and server.subprocess.Popen is not real_subprocess.Popen
    assert server.subprocess.PIPE == real_subprocess.PIPE  # the rest is subprocess itself
    assert prefect.moved() == []


TIMEOUT_PROBE = """
import asyncio, contextvars, gc, time, weakref
import uvloop
from bentoml._internal.server.http.traffic import TimeoutMiddleware
from core.compat.bentoml import cancel_request_timers

assert cancel_request_timers() and cancel_request_timers()  # idempotent
REQUEST = contextvars.ContextVar("request")

class Span:  # what an outer middleware (tracing) keeps in the request's context
    pass

async def answers(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

async def hangs(scope, receive, send):
    await asyncio.sleep(30)

async def fails(scope, receive, send):
    raise ValueError("broken before answering")

async def main():
    sent = []
    async def send(message):
        sent.append(message)
    async def receive():
        return {"type": "http.request", "body": b""}
    async def request(app, timeout):
        span = Span()
        REQUEST.set(span)
        await TimeoutMiddleware(app, timeout=timeout)({"type": "http"}, receive, send)
        return weakref.ref(span)

    span = await asyncio.create_task(request(answers, 30))
    await asyncio.sleep(0.01)
    gc.collect()
    print("answered", sent[0]["status"], "request kept", span() is not None)
    sent.clear()
    started = time.perf_counter()
    await asyncio.create_task(request(hangs, 0.2))
    print("timed out", sent[0]["status"], round(time.perf_counter() - started, 1))
    started = time.perf_counter()
    try:
        await asyncio.create_task(request(fails, 5))
    except ValueError as exc:
        print("raised", repr(str(exc)), "after", round(time.perf_counter() - started, 1))

uvloop.run(main())
"""


def test_the_bentoml_patch_releases_a_finished_request_and_keeps_the_timeout():
    """BentoML's per-request timeout timer held a finished request (its tracing span, futures
    and callbacks) for the whole traffic.timeout: some 450,000 objects per worker at 500
    requests a second, which every full garbage collection walked (a 300-500 ms stall, the
    service's p99). Patched, a finished request is released at once; a request that takes too
    long still gets BentoML's 504, and an app that fails before answering fails at once
    rather than after the timeout."""
    out = subprocess.run([sys.executable, "-c", TIMEOUT_PROBE], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["answered 200 request kept False", "timed out 504 0.2",
                                       "raised 'broken before answering' after 0.0"], out.stdout
