"""Ray Train's PyTorch backend, with the DDP rendezvous store kept on loopback.

Rank 0 of a DDP group hosts torch's ``TCPStore``, which torch binds to every interface whatever
host it is given, and Ray Train exposes no option for it. Each worker applies
``core.compat.torch.loopback_rendezvous_store`` before the group starts: with the workers' node
on loopback (a local Ray, ``compute.ray_session``) the store listens there only; on a real
cluster the node address is routable and nothing changes.
"""

from __future__ import annotations

from typing import Any

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend


def _loopback_store_in_this_worker() -> None:
    """Make this worker's rank-0 rendezvous store listen on its (loopback) host only."""
    from core.compat.torch import loopback_rendezvous_store

    loopback_rendezvous_store()


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group: Any, backend_config: Any) -> None:
        worker_group.execute(_loopback_store_in_this_worker)
        super().on_start(worker_group, backend_config)


class LoopbackTorchConfig(TorchConfig):
    """``TorchConfig`` whose rendezvous store binds to the node's own (loopback) address."""

    @property
    def backend_cls(self) -> type[_TorchBackend]:
        return _LoopbackTorchBackend
