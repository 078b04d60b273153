"""Hyper-LoRA: a small hypernetwork that maps a style vector to LoRA weight deltas for the UNet.

For each target layer W (a Linear of the UNet, named by suffix in `targets`), the delta is
`B(s) @ A`: A (rank x in) is learned once and shared by everyone, B(s) (out x rank) is a function of
the style vector s. The deltas are therefore a function of the style alone, so a withdrawn photo,
which changes the style vector, changes the deltas too: withdrawal stays exact for them.

Training and serving apply the same deltas the same way, through `low_rank.added` (one `x @ A^T`
for the batch, one `bmm` with the rows' B): training with `layer_deltas(styles, strengths)`, one style
per sample and differentiable; serving with `low_rank(style, strength)`, one person's deltas kept on
the device between requests (serving/lora.py), every person's A the same tensor.

File format (safetensors): the network's tensors plus metadata `format=stylestream-hyper-lora`,
the input size, rank, hidden size and the target layers with their sizes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stylestream.models.low_rank import LowRank

HYPER_LORA_FILE = "hyper-lora.safetensors"
FORMAT = "stylestream-hyper-lora"
# The feed-forward output of every transformer block: a style-dependent delta added there shifts
# colour and tone in the residual stream. One layer per block: each target adds two small matrix
# products to every call (with the attention outputs as well, 3 layers per block, through peft's
# per-adapter loop, the tiny model's cost was 1.46x).
DEFAULT_TARGETS = ("ff.net.2",)


def target_layers(unet: nn.Module, suffixes: tuple[str, ...] = DEFAULT_TARGETS) -> list[tuple[str, int, int]]:
    """(module name, in features, out features) of every Linear in the UNet named by one of `suffixes`."""
    return [(name, m.in_features, m.out_features) for name, m in unet.named_modules()
            if isinstance(m, nn.Linear) and name.endswith(suffixes) and ".processor." not in name]


class HyperLora(nn.Module):
    def __init__(self, input_dim: int, targets: list[tuple[str, int, int]], rank: int = 4, hidden: int = 128,
                 seed: int = 0):
        super().__init__()
        self.input_dim, self.rank, self.hidden = input_dim, rank, hidden
        self.targets = list(targets)
        g = torch.Generator().manual_seed(seed)
        # Standardization of the input, fitted on the training vectors (`fit_input`), saved with the net.
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(input_dim))
        self.trunk = nn.Sequential(nn.Linear(input_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        self.head = nn.Linear(hidden, sum(out * rank for _, _, out in self.targets))
        nn.init.zeros_(self.head.weight)  # every delta starts at zero: the base model is untouched at step 0
        nn.init.zeros_(self.head.bias)
        self.down = nn.ParameterList(
            nn.Parameter(torch.randn(rank, fan_in, generator=g) / fan_in**0.5) for _, fan_in, _ in self.targets)

    def fit_input(self, vectors: np.ndarray) -> None:
        """Standardize inputs by the training vectors' mean and spread (per component)."""
        v = torch.as_tensor(vectors, dtype=torch.float32)
        self.input_mean.copy_(v.mean(0))
        self.input_scale.copy_(v.std(0).clamp_min(1e-4))

    def deltas(self, styles: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per target layer: (A (rank, in), B (batch, out, rank)) for a (batch, input_dim) tensor of styles."""
        h = self.trunk((styles - self.input_mean) / self.input_scale)
        flat = self.head(h)
        out, start = [], 0
        for (_, _, fan_out), down in zip(self.targets, self.down, strict=True):
            size = fan_out * self.rank
            out.append((down, flat[:, start:start + size].view(-1, fan_out, self.rank)))
            start += size
        return out

    def layer_deltas(self, styles: torch.Tensor,
                     strengths: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per target layer, (A, strength_i * B(s_i)) for `low_rank.added`."""
        scale = strengths.view(-1, 1, 1)
        return {name: (down, scale.to(up.dtype) * up)
                for (name, _, _), (down, up) in zip(self.targets, self.deltas(styles), strict=True)}

    def low_rank(self, style: np.ndarray, strength: float = 1.0) -> dict[str, LowRank]:
        """One style's deltas at `strength`, on the net's device: what serving adds for one person."""
        with torch.no_grad():
            like = self.input_mean
            pairs = self.deltas(torch.as_tensor(style, dtype=like.dtype, device=like.device)[None])
        return {name: LowRank(down.detach(), strength * up[0])
                for (name, _, _), (down, up) in zip(self.targets, pairs, strict=True)}

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        meta = {"format": FORMAT, "input_dim": str(self.input_dim), "rank": str(self.rank),
                "hidden": str(self.hidden), "targets": json.dumps(self.targets)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp), metadata=meta)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> HyperLora:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a hyper-LoRA file (made by `stylestream train-adapter`)")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        net = cls(int(meta["input_dim"]), [tuple(t) for t in json.loads(meta["targets"])], int(meta["rank"]),
                  int(meta["hidden"]))
        net.load_state_dict(tensors)
        return net.eval()
