"""Per-user LoRA adapters for the diffusion UNet: a bounded set kept on the device, each row of a
batch getting its own person's adapter in one batched operation (models/low_rank.py).

An adapter comes from one of two sources: a user's own fine-tuned file, `<user_id>.safetensors` in
a folder, in the diffusers/peft LoRA format that peft training writes (`unet.<layer>.lora_A.weight`,
`lora_B.weight`, optionally `unet.<layer>.alpha`), on the UNet's Linear layers; or the hyper-LoRA,
which makes a user's adapter from one style version (models/hyper_lora.py), cached by version and
dropped with it. Files of any rank mix in one batch (padded to the largest); rows without an adapter
get nothing added.
"""

from __future__ import annotations

import contextlib
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from stylestream.models import low_rank
from stylestream.models.low_rank import LowRank

Adapter = dict[str, LowRank]  # UNet layer name -> its delta
_KEY = re.compile(r"unet\.(?P<layer>.+)\.(?:(?P<part>lora_A|lora_B)\.weight|(?P<alpha>alpha))")


@dataclass(frozen=True)
class LoraSource:
    key: str  # what identifies the adapter once loaded
    user_id: str
    weights: Callable[[], Adapter] = field(compare=False, repr=False)
    style_version: int | None = None  # set for adapters made from one style version


def _plain_name(user_id: str) -> bool:
    """Whether the id is a file name in the adapter folder and nothing else ("..", "a/b" are not)."""
    return "/" not in user_id and not user_id.startswith(".")


def from_state_dict(state_dict: dict[str, torch.Tensor], unet: nn.Module) -> Adapter:
    """A diffusers/peft LoRA state dict as per-layer deltas, its scale (alpha / rank, 1 without an
    alpha) folded into B; ValueError, naming the key, for anything serving cannot apply."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state_dict.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise ValueError(f"LoRA key {key!r} is not unet.<layer>.lora_A.weight, lora_B.weight or alpha "
                             "(the diffusers/peft format, Linear layers only)")
        parts.setdefault(m["layer"], {})[m["part"] or "alpha"] = tensor
    adapter = {}
    for layer, p in sorted(parts.items()):
        try:
            module = unet.get_submodule(layer)
        except AttributeError:
            raise ValueError(f"LoRA layer {layer!r} is not in the UNet") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"LoRA layer {layer!r} is a {type(module).__name__}; only Linear layers are served")
        if "lora_A" not in p or "lora_B" not in p:
            raise ValueError(f"LoRA layer {layer!r} lacks its lora_A or lora_B weight")
        down, up = p["lora_A"], p["lora_B"]
        rank = down.shape[0]
        if down.shape != (rank, module.in_features) or up.shape != (module.out_features, rank):
            raise ValueError(f"LoRA layer {layer!r}: A {tuple(down.shape)} and B {tuple(up.shape)} do not fit a "
                             f"{module.in_features}->{module.out_features} layer")
        scale = float(p["alpha"]) / rank if "alpha" in p else 1.0
        adapter[layer] = LowRank(down.float(), scale * up.float())
    return adapter


class UserLoras:
    def __init__(self, unet: nn.Module, folder: Path | None, max_loaded: int = 8):
        self.unet = unet
        self.folder = folder
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple[Adapter, LoraSource]] = OrderedDict()

    def _file(self, user_id: str) -> Path:
        """`<folder>/<user_id>.safetensors`, only where the id is one plain file name."""
        if not _plain_name(user_id):
            raise ValueError(f"user id {user_id!r} cannot name an adapter file")
        return self.folder / f"{user_id}.safetensors"

    def has(self, user_id: str) -> bool:
        return self.folder is not None and _plain_name(user_id) and self._file(user_id).is_file()

    def of_user(self, user_id: str) -> LoraSource:
        """The user's own adapter file."""
        from safetensors.torch import load_file

        return LoraSource(user_id, user_id, lambda: from_state_dict(load_file(self._file(user_id)), self.unet))

    def adapters(self, sources: list[LoraSource | None]) -> list[Adapter | None]:
        """The adapter of each sample (None for none), loading what is missing and unloading the least
        recently used beyond `max_loaded` (never one this batch needs)."""
        wanted = {s.key: s for s in sources if s is not None}
        if len(wanted) > self.max_loaded:
            raise ValueError(f"a batch needs {len(wanted)} LoRA adapters, at most {self.max_loaded} fit")
        missing = sorted(set(wanted) - set(self._loaded))
        for key in set(wanted) - set(missing):
            self._loaded.move_to_end(key)
        while len(self._loaded) + len(missing) > self.max_loaded:  # make room first: the device is bounded
            self._loaded.pop(next(k for k in self._loaded if k not in wanted))
        for key in missing:
            self._loaded[key] = (self._on_device(wanted[key].weights()), wanted[key])
        return [self._loaded[s.key][0] if s is not None else None for s in sources]

    def _on_device(self, adapter: Adapter) -> Adapter:
        """Deltas on the UNet's device and in its dtype. `.to` keeps a tensor already there as it is,
        so the hyper-LoRA's shared A stays one tensor."""
        param = next(self.unet.parameters())
        return {layer: LowRank(d.down.to(param.device, param.dtype), d.up.to(param.device, param.dtype))
                for layer, d in adapter.items()}

    def loaded(self) -> list[str]:
        """Keys of the loaded adapters, least recently used first."""
        return list(self._loaded)

    def drop_versions(self, is_gone: Callable[[str, int], bool]) -> None:
        """Unload adapters made from style versions that `is_gone(user_id, version)` (withdrawn ones)."""
        for key, (_, source) in list(self._loaded.items()):
            if source.style_version is not None and is_gone(source.user_id, source.style_version):
                del self._loaded[key]

    def forget(self, user_id: str) -> None:
        """A forgotten person: their adapters unloaded and their own adapter file deleted."""
        for key, (_, source) in list(self._loaded.items()):
            if source.user_id == user_id:
                del self._loaded[key]
        if self.has(user_id):
            self._file(user_id).unlink()

    def per_sample(self, rows: list[Adapter | None]) -> contextlib.AbstractContextManager:
        """Within the block, UNet row i gets rows[i]'s deltas: each layer's deltas stacked once here,
        for every denoising step of the call."""
        layers = sorted({layer for r in rows if r for layer in r})
        return low_rank.added(self.unet, {layer: low_rank.stacked([r.get(layer) if r else None for r in rows])
                                          for layer in layers})
