"""Per-user LoRA adapters (peft) for the diffusion UNet: a bounded set kept loaded on the device,
several users' adapters applied within one batch.

Adapters live in a folder as `<user_id>.safetensors` (diffusers LoRA format). peft's LoRA layers
apply a different adapter to each row of a batch when given `adapter_names`; diffusers' UNet does not
pass that argument down, so a forward pre-hook on every LoRA layer supplies it for the call.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


class UserLoras:
    def __init__(self, pipe, folder: Path | None, max_loaded: int = 8):
        self.pipe = pipe
        self.folder = folder
        self.max_loaded = max_loaded
        self._loaded: OrderedDict[str, str] = OrderedDict()  # user_id -> adapter name, least recent first

    def has(self, user_id: str) -> bool:
        return self.folder is not None and (self.folder / f"{user_id}.safetensors").is_file()

    def adapters(self, user_ids: list[str | None]) -> list[str]:
        """An adapter name per sample (BASE for none), loading what is missing and unloading the least
        recently used beyond `max_loaded` (never one this batch needs)."""
        wanted = {u for u in user_ids if u is not None}
        if len(wanted) > self.max_loaded:
            raise ValueError(f"a batch needs {len(wanted)} LoRA adapters, at most {self.max_loaded} fit")
        missing = sorted(wanted - set(self._loaded))
        for user in wanted - set(missing):
            self._loaded.move_to_end(user)
        while len(self._loaded) + len(missing) > self.max_loaded:  # make room first: the device is bounded
            old = next(u for u in self._loaded if u not in wanted)
            self.pipe.delete_adapters(self._loaded.pop(old))
        for user in missing:
            name = "user_" + hashlib.sha256(user.encode()).hexdigest()[:16]
            self.pipe.load_lora_weights(str(self.folder), weight_name=f"{user}.safetensors", adapter_name=name)
            self._loaded[user] = name
        return [self._loaded[u] if u is not None else BASE for u in user_ids]

    def loaded(self) -> list[str]:
        return list(self._loaded)

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
