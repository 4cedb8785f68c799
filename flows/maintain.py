"""``python -m flows.maintain``: compact and vacuum a dataset's Delta tables (raw, quarantine,
features, the service's logs), keeping every version a registered model or a feature table
version still names readable. Scheduled daily by the ``maintain-daily`` deployment.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Any

from prefect import flow, get_run_logger
from pydantic import BaseModel, Field

from core.contract import load_contract
from core.registry import Registry
from core.settings import get_settings
from flows._runtime import lake_for, main, model_name_for, run_started


class MaintainParams(BaseModel):
    """Compact small files and vacuum old ones; named versions stay readable."""

    dataset: str = Field("flights", description="Dataset whose tables are maintained.")
    retention_hours: int = Field(168, ge=0, description="Files no kept version needs go once this old.")
    dry_run: bool = Field(False, description="Report what vacuum would remove; compact nothing.")


class MaintainResult(BaseModel):
    tables: list[dict[str, Any]]


@flow(name="maintain", log_prints=True)
def maintain(params: MaintainParams = MaintainParams()) -> MaintainResult:
    from tasks.maintain import maintain_task, named_versions_task, registered_feature_versions

    run_started()
    logger = get_run_logger()
    settings = get_settings()
    contract = load_contract(params.dataset)
    lake = lake_for(settings)
    registry = Registry.for_uri(settings.tracking_uri)
    named = named_versions_task(lake, contract, registered_feature_versions(registry, model_name_for(contract.name)))
    uris = [lake.uri(zone, contract.name, table) for zone in ("raw", "quarantine") for table in contract.tables]
    uris += [lake.uri("features", contract.name)]
    uris += [lake.uri("serving", contract.name, log) for log in ("predictions", "feedback")]
    done = []
    for uri in uris:
        if lake.exists(uri):
            result = maintain_task(lake, uri, named.get(uri, set()), params.retention_hours, params.dry_run)
            done.append(asdict(result))
    logger.info("maintained %d tables", len(done))
    return MaintainResult(tables=done)


def report(result: MaintainResult) -> None:
    for table in result.tables:
        print(f"{table['uri']}: {table['files_before']} -> {table['files_after']} files, vacuum removed "
              f"{table['vacuumed_files']}; {'; '.join(table['notes'])}")


if __name__ == "__main__":
    sys.exit(main(maintain, MaintainParams, sys.argv[1:], "python -m flows.maintain", report))
