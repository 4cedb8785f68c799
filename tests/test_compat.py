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
         "core.compat.deltalake": "deltalake"}


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
            "print(sorted(m for m in ('prefect', 'ray', 'torch', 'deltalake') if m in sys.modules))")
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
