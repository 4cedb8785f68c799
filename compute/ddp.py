"""Ray Train's PyTorch backend, with the DDP rendezvous store kept on loopback.

Rank 0 of a DDP group hosts torch's ``TCPStore`` on ``MASTER_ADDR:MASTER_PORT``. torch binds
that store to every interface whatever host it is given (``TCPStore("127.0.0.1", ...)``
listens on ``::``, torch 2.13), and Ray Train exposes no option for it. torch does accept an
already listening socket (``master_listen_fd``), so when the workers' node address is
loopback (a local Ray, ``compute.ray_session``) rank 0 binds the socket to that address itself
and hands it over. On a real cluster the node address is routable and the store must listen
on it: nothing changes there.
"""

from __future__ import annotations

import socket
from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

_listeners: list[socket.socket] = []  # the store owns the fd; keep the socket alive with it


def _loopback_store_in_this_worker() -> None:
    """Make this worker's rank-0 rendezvous store listen on its (loopback) host only."""
    import importlib

    # By module path: ``torch.distributed.rendezvous`` is also a function of torch.distributed.
    rendezvous = importlib.import_module("torch.distributed.rendezvous")
    original = rendezvous._create_c10d_store
    if getattr(original, "flywheel_loopback", False):
        return

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


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute(_loopback_store_in_this_worker)
        super().on_start(worker_group, backend_config)


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store binds to the node's own (loopback) address."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend
