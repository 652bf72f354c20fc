"""Data-parallel DP-SGD across processes: the Lightning strategy and the replica check.

PyTorch's DistributedDataParallel averages `.grad` during every backward pass. Under
DP-SGD that is wrong twice over: the gradients that matter are the clipped per-sample ones
(ghost clipping's second pass would be averaged before Opacus' own sum), and ranks run
different numbers of micro-batches when Poisson sampling gives them different batch sizes,
so backward-time collectives would wait forever. `DPDDPStrategy` therefore wraps the model
in Opacus' `DifferentiallyPrivateDistributedDataParallel`, which only makes the replicas
start equal; Opacus' distributed optimizer sums the clipped, once-noised gradients across
ranks at the end of each logical step.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from torch import nn

from dpdit.randomness import tensor_digest


class DPDDPStrategy(DDPStrategy):
    """Lightning's DDP process handling (launch, ranks, SLURM, checkpoints on rank 0) without
    PyTorch's gradient averaging, which `dpdit.privacy` does once per logical step."""

    strategy_name = "dp_ddp"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        return DifferentiallyPrivateDistributedDataParallel(model)

    def teardown(self) -> None:
        if isinstance(self.model, DifferentiallyPrivateDistributedDataParallel):
            self.model = self.lightning_module
        super().teardown()


def parameters_digest(module: nn.Module) -> str:
    """A hash of every parameter's name and bits."""
    return tensor_digest(module.named_parameters())


def check_replicas_identical(module) -> None:
    """Raise if any rank's weights (or EMA) differ from rank 0's by a single bit."""
    digests = [None] * module.trainer.world_size
    torch.distributed.all_gather_object(digests, parameters_digest(module))
    if len(set(digests)) > 1:
        raise RuntimeError(
            "the replicas' weights differ across ranks after training; the DP update was not "
            "applied identically everywhere (digests: " + ", ".join(d[:12] for d in digests) + ")"
        )
