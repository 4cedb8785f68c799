"""ETL work: resolve raw table versions, build the feature table with Dask (cached)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from core.contract import DatasetContract
from core.lake import Lake, LakeError
from core.settings import DaskSettings


def resolve_raw_versions(lake: Lake, contract: DatasetContract,
                         requested: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Identity (uri, table id, version) of each raw table the features read.

    Missing versions default to the latest; a missing table is a clear error.
    """
    requested = requested or {}
    needed = contract.feature_tables()
    unknown = sorted(set(requested) - set(needed))
    if unknown:
        raise LakeError(f"raw versions given for tables the features do not read: {unknown}")
    identities = {}
    for table in needed:
        uri = lake.uri("raw", contract.name, table)
        if not lake.exists(uri):
            raise LakeError(f"no raw table {table!r} at {uri}: run `python -m flows.ingest` first")
        identities[table] = lake.identity(uri, requested.get(table))
        source = contract.tables[table].source
        if source.kind == "stream":
            # The last stream message the version holds: the feature table records it (lineage).
            from core.stream import app_id_for, id_of

            held = lake.table(uri, identities[table]["version"]).transaction_version(app_id_for(source))
            identities[table]["stream"] = {"stream": source.stream, "group": source.group,
                                           "last_id": id_of(int(held or 0))}
    return identities


def etl_code_fingerprint() -> str:
    """sha256 over the transform and the ETL graph's source code."""
    import compute.etl
    import core.features
    import core.transform

    digest = hashlib.sha256()
    for module in (core.features, core.transform, compute.etl):
        digest.update(Path(str(module.__file__)).read_bytes())
    return digest.hexdigest()


def etl_cache_key(context: Any, parameters: dict[str, Any]) -> str:
    """Prefect cache key: input Delta identities and versions, contract, transform code, lake."""
    lake: Lake = parameters["lake"]
    contract: DatasetContract = parameters["contract"]
    blob = json.dumps({
        "lake": lake.root,
        "raw": parameters["raw_tables"],
        "contract": contract.fingerprint(),
        "code": etl_code_fingerprint(),
    }, sort_keys=True)
    return "etl-" + hashlib.sha256(blob.encode()).hexdigest()


def build_features(lake: Lake, contract: DatasetContract, raw_tables: dict[str, dict[str, Any]],
                   dask: DaskSettings, flow_run_id: str = "") -> Any:
    """Build a new feature table version on the configured Dask cluster."""
    from compute.dask_session import dask_client
    from compute.etl import build_feature_table

    versions = {table: identity["version"] for table, identity in raw_tables.items()}
    with dask_client(dask) as client:
        return build_feature_table(lake, contract, versions, client, dask.partition_rows, flow_run_id)


resolve_raw_versions_task = task(name="resolve raw versions", cache_policy=NO_CACHE)(resolve_raw_versions)
# Persisted and keyed on the inputs' Delta versions and the transform's code, so an unchanged
# rerun returns the earlier feature version without doing any work.
build_features_task = task(name="build feature table", cache_key_fn=etl_cache_key, persist_result=True,
                           retries=1, retry_delay_seconds=5)(build_features)
