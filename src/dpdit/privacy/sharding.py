"""DP-SGD on sharded parameters (FSDP2's `fully_shard`, `trainer=fsdp`): each trained
parameter is a DTensor whose rows are split over the ranks, and each rank runs the step on
its share of the logical batch.

Per-image norms and clipping need each image's whole gradient; book-keeping clipping forms
them from a layer's inputs and output gradients, which every rank holds for its own images
while FSDP has the layer's weights gathered. What is sharded is the clipped sum: each
layer's sum over this rank's images is summed over the ranks and cut to this rank's rows in
one reduce-scatter, so no rank holds more than its shard of the gradient once the layer is
done. Each rank then adds noise to its own rows only, drawn at their place in the whole
parameter's stream (`dpdit.randomness.TensorShard`): every coordinate gets its noise once,
and the whole model's noise is the one a single process draws, whatever the number of ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch.distributed.tensor import DTensor, Partial, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from dpdit.randomness import TensorShard


def is_sharded(parameters: Iterable[torch.Tensor]) -> bool:
    return any(isinstance(p, DTensor) for p in parameters)


def as_gradient(parameter: torch.Tensor, clipped_sum: torch.Tensor) -> torch.Tensor:
    """`clipped_sum` (this rank's images, the whole parameter's shape) as `parameter`'s
    gradient: itself, or for a sharded parameter, the sum over ranks of this rank's rows."""
    clipped_sum = clipped_sum.to(parameter.dtype)
    if not isinstance(parameter, DTensor):
        return clipped_sum
    mesh = parameter.device_mesh
    partial = DTensor.from_local(clipped_sum, mesh, [Partial()] * mesh.ndim, run_check=False)
    return partial.redistribute(mesh, parameter.placements)


def noise_target(tensor: torch.Tensor) -> torch.Tensor | TensorShard:
    """What the noise is added to: the tensor, or for a sharded one, this rank's rows at
    their place in the whole tensor."""
    if not isinstance(tensor, DTensor):
        return tensor
    if any(not isinstance(p, Shard) or p.dim != 0 for p in tensor.placements):
        raise ValueError(f"sharded gradients must be split by rows (Shard(0)), got {tensor.placements}")
    local = tensor.to_local()
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    row = math.prod(tensor.shape[1:])
    return TensorShard(local, tensor.numel(), offset[0] * row if local.numel() else 0)


def busiest_rank_count(count: int, device: torch.device) -> int:
    """The largest `count` over the ranks: under FSDP every forward pass gathers weights
    with every rank, so each rank runs as many micro-batches as the one with most images."""
    counts = torch.tensor(count, device=device)
    torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.MAX)
    return int(counts)
