"""Prefect flows: each module wires tasks and runs as ``python -m flows.<name>``.

Run so, with no ``PREFECT_API_URL`` set, a flow reports to the Prefect server of ``make up``'s
stack when that stack runs for this home (its runs show in the UI); else Prefect starts a
temporary server for the command, as it does by default."""

import os as _os
import sys as _sys

if _sys.argv[:1] == ["-m"] and "PREFECT_API_URL" not in _os.environ:  # python -m flows.<name>, being located
    from flows._runtime import use_running_stack

    use_running_stack(_sys.argv[1:])
