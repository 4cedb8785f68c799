"""Entry points: the CLI and the Prefect form come from one parameter model; `--help` is cheap;
settings come from the profile, then the environment, then the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from core.cli import parse

HEAVY = ("torch", "ray", "great_expectations", "evidently", "mlflow", "bentoml", "pandas", "dask")


@pytest.mark.parametrize("module", ["flows.ingest", "flows.etl", "flows.pipeline", "flows.train"])
def test_help_imports_nothing_heavy(module: str):
    code = (f"import sys, runpy; sys.argv=['x', '--help']\n"
            f"try:\n    runpy.run_module('{module}', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "--smoke-test" in out and "--profile" in out
    assert "HEAVY []" in out


def test_cli_builds_the_same_model_the_ui_uses():
    from flows.etl import EtlParams

    params, overrides = parse(EtlParams, ["--raw-versions", "flights=3", "--raw-versions", "weather=1",
                                          "--smoke-test", "--home", "/tmp/x"], "etl")
    assert params == EtlParams(raw_versions={"flights": 3, "weather": 1}, smoke_test=True)
    assert overrides == {"profile": None, "home": "/tmp/x", "debug": False}
    with pytest.raises(SystemExit):
        parse(EtlParams, ["--raw-versions", "flights=three"], "etl")


def test_settings_precedence_profile_env_cli(monkeypatch, tmp_path):
    from core.settings import configure

    monkeypatch.setenv("FLYWHEEL_DASK__PARTITION_ROWS", "12345")
    settings = configure()
    assert settings.profile == "local" and settings.dask.partition_rows == 12345
    assert settings.ray.num_cpus is None  # a local Ray may use every core
    assert configure(ray={"address": "127.0.0.1:6379"}).ray.address == "127.0.0.1:6379"
    settings = configure(home=str(tmp_path))
    assert settings.home == tmp_path and settings.lake == str(tmp_path / "lake")
    with pytest.raises(ValueError, match="cannot be combined"):
        configure(dask={"address": "tcp://127.0.0.1:8786", "processes": True})
    monkeypatch.setenv("FLYWHEEL_PROFILE", "cluster")
    assert configure().profile == "cluster"
    with pytest.raises(ValueError, match="profile 'nope' not found"):
        monkeypatch.setenv("FLYWHEEL_PROFILE", "nope")
        configure()
    monkeypatch.delenv("FLYWHEEL_PROFILE")
    configure()


@pytest.mark.slow
def test_a_bad_option_prints_one_clear_line_and_a_traceback_only_with_debug(tmp_path):
    """Found: `ingest --tables weathr` printed a 53-line traceback before its clear last line."""
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    runs = {debug: subprocess.Popen(
        [sys.executable, "-m", "flows.ingest", "--tables", "weathr", "--home", str(tmp_path / str(debug)),
         *(["--debug"] if debug else [])], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for debug in (False, True)}
    outputs = {debug: proc.communicate(timeout=300)[0] for debug, proc in runs.items()}
    for debug, proc in runs.items():
        assert proc.returncode == 1, outputs[debug][-2000:]
        assert "unknown table(s) ['weathr'] for dataset 'flights'" in outputs[debug]
    assert "Traceback" not in outputs[False]
    assert "python -m flows.ingest failed: unknown table(s) ['weathr']" in outputs[False]
    assert "Traceback" in outputs[True]
