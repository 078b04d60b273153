"""open_clip image/text encoders: one loading path for pretrained and small random-weight models.

A `ClipSpec` names an open_clip architecture and where its weights come from: an open_clip
pretrained tag (e.g. ViT-B-32 + "laion2b_s34b_b79k", needs the weights cached locally), a local
checkpoint file, or nothing (random weights, for tests only). The tiny default architecture ships in
configs/clip/ and its checkpoint is written once by `ensure_tiny_clip`, so the demo and tests load
it exactly as production loads real weights.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import open_clip
import torch

from stylestream.defaults import TINY_CLIP

CONFIG_DIR = Path(__file__).parent / "configs" / "clip"


@cache
def _register_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


@dataclass(frozen=True)
class ClipSpec:
    model: str = TINY_CLIP
    pretrained: str | None = None  # open_clip tag, or a path to a .pt/.safetensors checkpoint

    def describe(self) -> str:
        return f"{self.model} ({self.pretrained or 'random weights'})"


_RANDOM_INIT = threading.Lock()


def load_clip(spec: ClipSpec, device: str = "cpu"):
    """Returns (model in eval mode, image preprocess transform, tokenizer)."""
    _register_configs()
    if spec.pretrained is None:
        # Random weights, but the same ones in every process: seeded, and built by one thread at a
        # time (two models built at once draw from the one generator in turn, as a Flink worker
        # opening two subtasks did).
        with _RANDOM_INIT, torch.random.fork_rng():
            torch.manual_seed(0)
            model, _, preprocess = open_clip.create_model_and_transforms(spec.model, device=device)
    else:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.model, pretrained=spec.pretrained, device=device
        )
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(spec.model)


def ensure_tiny_clip(models_dir: Path) -> ClipSpec:
    """The tiny random-weight CLIP as a checkpoint file under models_dir, written on first use."""
    path = models_dir / "clip" / f"{TINY_CLIP}.safetensors"
    if not path.exists():
        from safetensors.torch import save_file

        model, _, _ = load_clip(ClipSpec(TINY_CLIP, None))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        tmp.rename(path)
    return ClipSpec(TINY_CLIP, str(path))


def clip_spec(models_dir: Path, model: str = TINY_CLIP, pretrained: str | None = None) -> ClipSpec:
    """What the command line asks for; the tiny default is materialized under models_dir."""
    if model == TINY_CLIP and pretrained is None:
        return ensure_tiny_clip(models_dir)
    if pretrained is None:
        raise ValueError(f"{model} needs pretrained weights (an open_clip tag or a checkpoint path)")
    return ClipSpec(model, pretrained)


@cache
def weights_id(spec: ClipSpec) -> str:
    """Which weights a spec loads, for style manifests: sha256:<hex> of a checkpoint file,
    open_clip:<tag> for open_clip's named weights, random:seed0 for the seeded random ones."""
    if spec.pretrained is None:
        return "random:seed0"
    path = Path(spec.pretrained)
    if not path.is_file():
        return f"open_clip:{spec.pretrained}"
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def embedding_dim(spec: ClipSpec) -> int:
    """Size of the model's image embedding, from its config (no weights loaded)."""
    _register_configs()
    cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {spec.model!r}; see open_clip.list_models()")
    return int(cfg["embed_dim"])
