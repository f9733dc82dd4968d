"""The Lightning strategy of a run on several processes (``trainer=ddp``, ``trainer=ddp_cpu``)."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy


class ShardedDDPStrategy(DDPStrategy):
    """Lightning's DDP: one process per device (and node), the process group, the launch (also
    under SLURM) — without the ``DistributedDataParallel`` wrapper. The solvers are not trained by
    gradients (the LOBPCG solver's table has ``requires_grad=False``, which DDP refuses to wrap):
    the LOBPCG solver holds its images' rows and exchanges rows and projected matrices itself
    (:mod:`ldsc.distributed`, ``docs/distributed.md``). Arguments are ``DDPStrategy``'s, e.g.
    ``process_group_backend`` (``nccl`` / ``gloo``)."""

    def _setup_model(self, model):
        return model

    def _register_ddp_hooks(self) -> None:
        return None
