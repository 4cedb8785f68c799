"""ETL: raw Delta tables -> Dask joins, derived features, fitted stats -> feature Delta table.

``python -m flows.etl`` reads the raw tables at the given (default: latest) versions and writes
a new version of the dataset's feature table with the feature statistics in its commit.
Re-running with unchanged input versions and transform code does no work: the Prefect cache
returns the earlier feature version, and the flow says so.
"""

from __future__ import annotations

import sys

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.settings import get_settings
from flows._runtime import artifact_key, lake_for, main, run_started
from tasks.etl import build_features_task, resolve_raw_versions_task


class EtlParams(BaseModel):
    """Build the versioned feature table from the raw Delta tables with Dask."""

    dataset: str = Field("flights", description="Dataset contract name (config/datasets/<name>.yaml).")
    raw_versions: dict[str, int] | None = Field(
        None, description="Raw table versions to read, e.g. flights=3 (default: latest of each).")
    smoke_test: bool = Field(False, description="Use the smoke lake written by ingest --smoke-test.")
    refresh: bool = Field(False, description="Rebuild even if the inputs are unchanged.")


class EtlResult(BaseModel):
    dataset: str
    feature_uri: str
    feature_version: int
    feature_stats_sha256: str
    raw_versions: dict[str, int]
    rows_by_split: dict[str, int]
    rows_without_label: int
    cached: bool


@flow(name="etl", log_prints=True)
def etl(params: EtlParams = EtlParams()) -> EtlResult:
    run_started()
    logger = get_run_logger()
    settings = get_settings()
    contract = load_contract(params.dataset)
    lake = lake_for(settings, params.smoke_test)

    raw_tables = resolve_raw_versions_task(lake, contract, params.raw_versions)
    # Cached results live in FLYWHEEL_HOME beside the lake they describe, so a home is
    # self-contained (copy it, delete it, or point another checkout at it).
    build = build_features_task.with_options(result_storage=settings.home / "prefect-results")
    if params.refresh:
        build = build.with_options(refresh_cache=True)
    state = build(lake, contract, raw_tables, settings.dask, str(flow_run.id or ""), return_state=True)
    built = state.result()
    cached = state.is_completed() and state.name == "Cached"
    if cached and lake.latest_version(built.feature_uri) is None:
        logger.warning("cached feature table %s is gone from the lake: rebuilding", built.feature_uri)
        built = build.with_options(refresh_cache=True)(lake, contract, raw_tables, settings.dask,
                                                        str(flow_run.id or ""))
        cached = False
    raw_versions = {t: i["version"] for t, i in built.raw_tables.items()}
    if cached:
        logger.info("inputs unchanged (raw versions %s, same transform code): reusing feature "
                    "table version %d, no work done", raw_versions, built.feature_version)
    else:
        logger.info("wrote feature table %s version %d in %.1fs: %s", built.feature_uri,
                    built.feature_version, built.seconds, built.rows_by_split)
    result = EtlResult(
        dataset=contract.name, feature_uri=built.feature_uri, feature_version=built.feature_version,
        feature_stats_sha256=built.stats.fingerprint(), raw_versions=raw_versions,
        rows_by_split=built.rows_by_split, rows_without_label=built.rows_without_label, cached=cached)
    create_markdown_artifact(_summary_markdown(result, built), key=artifact_key("etl", contract.name),
                             description="Feature table build")
    return result


def _summary_markdown(result: EtlResult, built) -> str:  # noqa: ANN001
    rows = "\n".join(f"| {split} | {n:,} |" for split, n in sorted(result.rows_by_split.items()))
    raw = "\n".join(f"| {t} | {i['version']} | `{i['table_id']}` |" for t, i in built.raw_tables.items())
    return (
        f"# Features for {result.dataset}\n\n"
        f"{'**Cached**: inputs unchanged, no work done.' if result.cached else 'Built now.'}\n\n"
        f"Feature table `{result.feature_uri}` version **{result.feature_version}**, "
        f"stats sha256 `{result.feature_stats_sha256[:16]}`.\n\n"
        f"| split | rows |\n|---|---|\n{rows}\n\n"
        f"Rows without a label (dropped): {result.rows_without_label:,}\n\n"
        f"| raw table | version | table id |\n|---|---|---|\n{raw}\n")


def report(result: EtlResult) -> None:
    status = "cached, no work done" if result.cached else "built"
    print(f"feature table {result.feature_uri} version {result.feature_version} ({status}); "
          f"rows {result.rows_by_split}; raw versions {result.raw_versions}")


if __name__ == "__main__":
    sys.exit(main(etl, EtlParams, sys.argv[1:], "python -m flows.etl", report))
