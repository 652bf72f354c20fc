"""DP-SGD across processes: the Lightning strategies (data-parallel replicas, or FSDP's
sharded weights) and the replica check.

PyTorch's DistributedDataParallel averages `.grad` during every backward pass. Under
DP-SGD that is wrong twice over: the gradients that matter are the clipped per-sample ones
(ghost clipping's second pass would be averaged before Opacus' own sum), and ranks run
different numbers of micro-batches when Poisson sampling gives them different batch sizes,
so backward-time collectives would wait forever. `DPDDPStrategy` therefore wraps the model
in Opacus' `DifferentiallyPrivateDistributedDataParallel`, which only makes the replicas
start equal; Opacus' distributed optimizer sums the clipped, once-noised gradients across
ranks at the end of each logical step.

`DPFSDPStrategy` shards instead (FSDP2's `fully_shard`, each transformer block a unit): a
rank holds its rows of every weight, gradient, optimizer state and EMA weight, and gathers
a block's weights only while it runs. The DP step's side of it is `dpdit.privacy.sharding`.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

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


class DPFSDPStrategy(ModelParallelStrategy):
    """Lightning's process handling (launch, ranks, SLURM) with FSDP2 over every process:
    one data-parallel dimension as wide as the world. The module shards itself in
    `configure_model` (`shard`). Checkpoints gather the whole state on rank 0 into one
    `last.ckpt`, the file one process writes, so a run resumes on any number of processes.

    Args:
        mixed_precision: `bf16` gathers the weights and runs the layers in bfloat16, the
            shards (and the DP step: norms, clipped sums, noise) stay float32; None keeps
            the parameters' precision.
    """

    strategy_name = "dp_fsdp"

    def __init__(self, mixed_precision: str | None = None, **kwargs):
        super().__init__(save_distributed_checkpoint=False, **kwargs)
        if mixed_precision not in (None, "bf16"):
            raise ValueError(f"trainer.strategy.mixed_precision={mixed_precision} is not one of null, bf16")
        self.mixed_precision = mixed_precision

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    @property
    def policy(self) -> MixedPrecisionPolicy:
        if self.mixed_precision == "bf16":
            return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        return MixedPrecisionPolicy()


def shard(model: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> None:
    """FSDP2 on `model`: each of its `sharding_units` a unit, the rest (embedders, final layer)
    the root's."""
    for unit in model.sharding_units():
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)


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
