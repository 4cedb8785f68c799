"""Ray: a local Ray kept on loopback (Ray issue #59110).

Ray rewrites a node address of 127.0.0.1 to the machine's address unless
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is 0, and its GCS, raylet, workers and agents then listen
on every interface. Ray reads that variable into ``ray._private.ray_constants`` when it is
imported: ``keep_on_loopback`` applies it to a Ray imported earlier. A local node started by
``ray start --address`` (``compute.ray_cluster``, several nodes on one machine) must not have the
variable set, so its command line (``PATCHED_CLI``) replaces ``resolve_ip_for_localhost``
instead.
"""

from __future__ import annotations

from core.compat import warn_untested

TESTED = ("2.60", "2.61")

PATCHED_CLI = (
    "import sys, ray._private.services as s\n"
    "s.resolve_ip_for_localhost = lambda host: host  # Ray issue #59110\n"
    "from ray.scripts.scripts import main\n"
    "sys.argv = ['ray'] + sys.argv[1:]\n"
    "main()\n"
)


def keep_on_loopback() -> bool:
    """False where this Ray has no ``ENABLE_RAY_CLUSTER`` (left alone)."""
    from ray._private import ray_constants

    warn_untested("ray", TESTED)
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        return False
    ray_constants.ENABLE_RAY_CLUSTER = False
    return True


def moved() -> list[str]:
    from ray._private import ray_constants, services
    from ray.scripts import scripts

    found = []
    if not hasattr(ray_constants, "ENABLE_RAY_CLUSTER"):
        found.append("ray._private.ray_constants.ENABLE_RAY_CLUSTER")
    if not callable(getattr(services, "resolve_ip_for_localhost", None)):
        found.append("ray._private.services.resolve_ip_for_localhost")
    if not callable(getattr(scripts, "main", None)):
        found.append("ray.scripts.scripts.main")
    return found
