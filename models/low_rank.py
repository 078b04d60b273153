"""Per-sample low-rank deltas on a UNet's Linear layers, as batched matrix products.

Row i of a batch gets `x_i A_i^T B_i^T` added to a layer's output. Where every row shares A (the
hyper-LoRA: A is learned once, B is a function of the person's style), that is `x @ A^T` once for
the batch and one `bmm` with the rows' stacked B; where rows bring their own A (people's LoRA files,
of any rank), A is stacked as well, zero-padded to the batch's largest rank, and it is two `bmm`s.
Either way the cost does not grow with the number of different people in a batch, as a loop over
the batch's adapters (peft's mixed-batch path) does. Training (models/style_training.py) and serving
(serving/lora.py) both add their deltas through `added`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LowRank:
    """One person's delta on one layer, `x A^T B^T`, with any scaling already in B."""

    down: torch.Tensor  # A: (rank, in features)
    up: torch.Tensor  # B: (out features, rank)


def stacked(rows: list[LowRank | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) for `added` from one layer's delta per row (None: nothing added to that row). A is the
    rows' shared (rank, in) matrix where every row has the same one, else (rows, rank, in); B is
    (rows, out, rank); both zero-padded to the largest rank."""
    present = [r for r in rows if r is not None]
    if not present:
        raise ValueError("no row has a delta on this layer")
    first = present[0]
    shared = all(_same(r.down, first.down) for r in present)
    rank = max(r.down.shape[0] for r in present)
    up = first.up.new_zeros(len(rows), first.up.shape[0], rank)
    down = first.down if shared else first.down.new_zeros(len(rows), rank, first.down.shape[1])
    for i, r in enumerate(rows):
        if r is not None:
            up[i, :, :r.down.shape[0]] = r.up
            if not shared:
                down[i, :r.down.shape[0]] = r.down
    return down, up


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The same matrix in memory (a shared A seen through different tensor objects)."""
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@contextlib.contextmanager
def added(model: nn.Module, layers: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Within the block, each named Linear adds `x_i A^T B_i^T` to row i of its output, for
    `layers[name] = (A, B)` with A (rank, in) shared or (rows, rank, in), and B (rows, out, rank)."""
    def hook(name: str, down: torch.Tensor, up: torch.Tensor):
        def add(_module, inputs, output):
            x = inputs[0]
            if x.shape[0] != up.shape[0]:
                raise ValueError(f"{name}: a batch of {x.shape[0]} rows, deltas for {up.shape[0]}")
            flat = x.reshape(x.shape[0], -1, x.shape[-1])
            low = flat @ down.T if down.dim() == 2 else torch.bmm(flat, down.transpose(1, 2))
            return output + torch.bmm(low, up.transpose(1, 2)).reshape(output.shape)
        return add

    handles = [model.get_submodule(name).register_forward_hook(hook(name, down, up))
               for name, (down, up) in layers.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
