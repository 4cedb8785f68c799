"""A separate ingest process for the concurrency and crash tests (not a test module).

``python tests/ingest_worker.py CONTRACT LAKE TABLE [--delay-commit S] [--kill before:N|after:N]``
reads the table's source, validates it and writes it with the real ``write_batch``, then prints
the outcome as JSON. Two fault injections wrap (never replace) ``Lake.commit``:
``--delay-commit`` sleeps before every commit, widening the gap between planning and committing
so that two processes surely overlap; ``--kill before:N`` / ``after:N`` SIGKILLs this process
just before or just after its N-th commit (1: the quarantine commit, 2: the raw commit when
the batch has quarantined rows), as a crash or an OOM kill would.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("contract")
    parser.add_argument("lake")
    parser.add_argument("table")
    parser.add_argument("--delay-commit", type=float, default=0.0)
    parser.add_argument("--kill", default=None)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock time to begin writing")
    args = parser.parse_args()

    from core.contract import load_contract
    from core.ingest import batch_fingerprint, read_batch, write_batch
    from core.lake import Lake
    from core.validation import validate

    contract = load_contract(args.contract)
    spec = contract.tables[args.table]
    batch, source = read_batch(args.table, spec)
    result = validate(batch, args.table, spec)

    real_commit = Lake.commit
    calls = {"n": 0}
    when, _, nth = (args.kill or "never:0").partition(":")

    def commit(self, *a, **kw):  # noqa: ANN001, ANN002, ANN003
        calls["n"] += 1
        if when == "before" and calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(args.delay_commit)
        version = real_commit(self, *a, **kw)
        if when == "after" and calls["n"] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return version

    Lake.commit = commit  # type: ignore[method-assign]
    time.sleep(max(0.0, args.start_at - time.time()))
    outcome = write_batch(Lake(args.lake), contract, result, source, batch_fingerprint(batch))
    print("OUTCOME " + json.dumps(outcome.as_row()))


if __name__ == "__main__":
    main()
