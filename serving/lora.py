"""Per-user LoRA adapters (peft) for the diffusion UNet: a bounded set kept loaded on the device,
several users' adapters applied within one batch.

An adapter comes from one of two sources: a user's own fine-tuned file, `<user_id>.safetensors`
(diffusers LoRA format) in a folder, or the hyper-LoRA, which materializes a user's adapter from one
style version (models/hyper_lora.py); those are cached by version and dropped with it. peft's LoRA layers
apply a different adapter to each row of a batch when given `adapter_names`; diffusers' UNet does not
pass that argument down, so a forward pre-hook on every LoRA layer supplies it for the call.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class LoraSource:
    key: str  # what identifies the adapter once loaded
    user_id: str
    weights: Callable[[], dict[str, torch.Tensor]] = field(compare=False, repr=False)
    style_version: int | None = None  # set for adapters made from one style version


def _plain_name(user_id: str) -> bool:
    """Whether the id is a file name in the adapter folder and nothing else ("..", "a/b" are not)."""
    return "/" not in user_id and not user_id.startswith(".")


class UserLoras:
    def __init__(self, pipe, folder: Path | None, max_loaded: int = 8):
        self.pipe = pipe
        self.folder = folder
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, tuple[str, LoraSource]] = OrderedDict()  # key -> (adapter name, source)

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

        return LoraSource(user_id, user_id, lambda: load_file(self._file(user_id)))

    def adapters(self, sources: list[LoraSource | None]) -> list[str]:
        """An adapter name per sample (BASE for none), loading what is missing and unloading the least
        recently used beyond `max_loaded` (never one this batch needs)."""
        wanted = {s.key: s for s in sources if s is not None}
        if len(wanted) > self.max_loaded:
            raise ValueError(f"a batch needs {len(wanted)} LoRA adapters, at most {self.max_loaded} fit")
        missing = sorted(set(wanted) - set(self._loaded))
        for key in set(wanted) - set(missing):
            self._loaded.move_to_end(key)
        while len(self._loaded) + len(missing) > self.max_loaded:  # make room first: the device is bounded
            self._unload(next(k for k in self._loaded if k not in wanted))
        for key in missing:
            name = "lora_" + hashlib.sha256(key.encode()).hexdigest()[:16]
            with warnings.catch_warnings():  # many named adapters on one model is the point here
                warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
                self.pipe.load_lora_weights(wanted[key].weights(), adapter_name=name)
            self._loaded[key] = (name, wanted[key])
        return [self._loaded[s.key][0] if s is not None else BASE for s in sources]

    def loaded(self) -> list[str]:
        """Keys of the loaded adapters, least recently used first."""
        return list(self._loaded)

    def drop_versions(self, is_gone: Callable[[str, int], bool]) -> None:
        """Unload adapters made from style versions that `is_gone(user_id, version)` (withdrawn ones)."""
        for key, (_, source) in list(self._loaded.items()):
            if source.style_version is not None and is_gone(source.user_id, source.style_version):
                self._unload(key)

    def forget(self, user_id: str) -> None:
        """A forgotten person: their adapters unloaded and their own adapter file deleted."""
        for key, (_, source) in list(self._loaded.items()):
            if source.user_id == user_id:
                self._unload(key)
        if self.has(user_id):
            self._file(user_id).unlink()

    def _unload(self, key: str) -> None:
        self.pipe.delete_adapters(self._loaded.pop(key)[0])

    @contextlib.contextmanager
    def per_sample(self, names: list[str]) -> Iterator[None]:
        """Within the block, UNet row i uses adapter names[i]."""
        from peft.tuners.lora import LoraLayer

        def hook(_module, args, kwargs):
            kwargs["adapter_names"] = names
            return args, kwargs

        handles = [m.register_forward_pre_hook(hook, with_kwargs=True)
                   for m in self.pipe.unet.modules() if isinstance(m, LoraLayer)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
