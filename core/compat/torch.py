"""torch: the DDP rendezvous store bound to a loopback address.

Rank 0 of a DDP group hosts torch's ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT``. torch binds
that store to every interface whatever host it is given (``TCPStore("127.0.0.1", ...)`` listens
on ``::``, torch 2.13). torch does accept an already listening socket (``master_listen_fd``),
so when the host is loopback, ``loopback_rendezvous_store`` makes rank 0 bind the socket to it
and hand it over. A routable host (a real cluster) is left as torch does it.
"""

from __future__ import annotations

import inspect
import socket
from typing import Any

from core.compat import warn_untested

TESTED = ("2.13", "2.14")
_listeners: list[socket.socket] = []  # the store owns the fd; keep the socket alive with it


def loopback_rendezvous_store() -> bool:
    """Idempotent; False where torch has no ``_create_c10d_store`` (left alone)."""
    import importlib

    warn_untested("torch", TESTED)
    # By module path: ``torch.distributed.rendezvous`` is also a function of torch.distributed.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = getattr(rendezvous, "_create_c10d_store", None)
    if original is None:
        return False
    if getattr(original, "flywheel_loopback", False):
        return True

    def create(hostname: str, port: int, rank: int, world_size: int, timeout: Any,
               use_libuv: bool = True) -> Any:
        if rank != 0 or not hostname.startswith("127."):
            return original(hostname, port, rank, world_size, timeout, use_libuv)
        from torch.distributed import TCPStore

        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((hostname, port))
        listener.listen(max(128, world_size))
        _listeners.append(listener)
        return TCPStore(hostname, port, world_size, True, timeout, multi_tenant=True,
                        master_listen_fd=listener.fileno(), use_libuv=use_libuv)

    create.flywheel_loopback = True  # type: ignore[attr-defined]
    setattr(rendezvous, "_create_c10d_store", create)  # noqa: B010 - a module attribute
    return True


def moved() -> list[str]:
    import importlib

    from torch.distributed import TCPStore

    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    found = []
    create = getattr(rendezvous, "_create_c10d_store", None)
    if create is None:
        found.append("torch.distributed.rendezvous._create_c10d_store")
    elif not getattr(create, "flywheel_loopback", False):
        expected = ["hostname", "port", "rank", "world_size", "timeout", "use_libuv"]
        if list(inspect.signature(create).parameters) != expected:
            found.append(f"torch.distributed.rendezvous._create_c10d_store{inspect.signature(create)}")
    if "master_listen_fd" not in (TCPStore.__init__.__doc__ or "") + str(TCPStore.__doc__):
        found.append("torch.distributed.TCPStore(master_listen_fd=...)")
    return found
