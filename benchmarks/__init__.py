"""Side-by-side benchmarks (see README.md); each module runs as ``python -m benchmarks.<name>``."""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def save_results(path: Path, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The runs with the date, machine and CPU count, written as JSON to ``path``."""
    results = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": platform.platform(),
               "cpus": os.cpu_count(), "runs": runs}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    return results
