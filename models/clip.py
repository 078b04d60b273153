"""open_clip image/text encoders: one loading path for pretrained and small random-weight models.

A `ClipSpec` names an open_clip architecture and where its weights come from: an open_clip
pretrained tag (e.g. ViT-B-32 + "laion2b_s34b_b79k", needs the weights cached locally), a local
checkpoint file, or nothing (random weights, for tests only). The tiny default architecture is in
configs/clip/ and its weights, trained here on captioned synthetic photos (models/tiny_style.py),
ship in trained/tiny-clip/: the demo and tests load that checkpoint exactly as production loads
real weights.
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
TRAINED_TINY_CLIP = Path(__file__).parent / "trained" / "tiny-clip" / f"{TINY_CLIP}.safetensors"


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


def save_clip(model, path: Path) -> None:
    """A checkpoint `load_clip` reads (ClipSpec(model name, str(path))), written atomically."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.chmod(0o644)  # safetensors writes it private; a shipped model is read by every user
    tmp.rename(path)


def ensure_tiny_clip(models_dir: Path) -> ClipSpec:
    """The tiny CLIP: the trained checkpoint the package ships, or where it lacks one (a checkout
    without models/trained/) the seeded random weights as a file under models_dir, which the tiny
    style model refuses (it names `python -m stylestream.models.tiny_style` to rebuild both)."""
    if TRAINED_TINY_CLIP.exists():
        return ClipSpec(TINY_CLIP, str(TRAINED_TINY_CLIP))
    path = models_dir / "clip" / f"{TINY_CLIP}.safetensors"
    if not path.exists():
        save_clip(load_clip(ClipSpec(TINY_CLIP, None))[0], path)
    return ClipSpec(TINY_CLIP, str(path))


def clip_spec(models_dir: Path, model: str = TINY_CLIP, pretrained: str | None = None) -> ClipSpec:
    """What the command line asks for; the tiny default is the shipped trained checkpoint (`ensure_tiny_clip`)."""
    if model == TINY_CLIP and pretrained is None:
        return ensure_tiny_clip(models_dir)
    if pretrained is None:
        raise ValueError(f"{model} needs pretrained weights (an open_clip tag or a checkpoint path)")
    return ClipSpec(model, pretrained)


def weights_id(spec: ClipSpec) -> str:
    """Which weights a spec loads, for style manifests: sha256:<hex> of a checkpoint file,
    open_clip:<tag> for open_clip's named weights, random:seed0 for the seeded random ones."""
    if spec.pretrained is None:
        return "random:seed0"
    path = Path(spec.pretrained)
    if not path.is_file():
        return f"open_clip:{spec.pretrained}"
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@cache
def _file_digest(path: str, _size: int, _mtime_ns: int) -> str:
    """sha256:<hex> of a checkpoint, once per file version (ingestion asks every cycle; a real model's
    checkpoint is hundreds of megabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def text_encoder_from_clip(model):
    """open_clip's text tower as a transformers CLIPTextModel, the form diffusers' pipelines take (as
    Stable Diffusion's text encoder is CLIP's): the same weights, the same token states (the final
    layer norm's output for every position)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    blocks = model.transformer.resblocks
    first = blocks[0]
    config = CLIPTextConfig(
        vocab_size=model.vocab_size, hidden_size=model.transformer.width, num_hidden_layers=len(blocks),
        intermediate_size=first.mlp.c_fc.out_features, num_attention_heads=first.attn.num_heads,
        max_position_embeddings=model.context_length, projection_dim=model.text_projection.shape[1],
        hidden_act="quick_gelu" if type(first.mlp.gelu).__name__ == "QuickGELU" else "gelu",
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    state = {"embeddings.token_embedding.weight": model.token_embedding.weight,
             "embeddings.position_embedding.weight": model.positional_embedding,
             "final_layer_norm.weight": model.ln_final.weight, "final_layer_norm.bias": model.ln_final.bias}
    for i, block in enumerate(blocks):
        at = f"encoder.layers.{i}."
        for name, w, b in zip(("q_proj", "k_proj", "v_proj"), block.attn.in_proj_weight.chunk(3),
                              block.attn.in_proj_bias.chunk(3), strict=True):
            state |= {f"{at}self_attn.{name}.weight": w, f"{at}self_attn.{name}.bias": b}
        for theirs, ours in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
            layer = block.get_submodule(theirs)
            state |= {f"{at}{ours}.weight": layer.weight, f"{at}{ours}.bias": layer.bias}
    encoder = CLIPTextModel(config)
    encoder.load_state_dict({k: v.detach().clone() for k, v in state.items()}, strict=True)
    return encoder.eval()


def embedding_dim(spec: ClipSpec) -> int:
    """Size of the model's image embedding, from its config (no weights loaded)."""
    _register_configs()
    cfg = open_clip.get_model_config(spec.model)
    if cfg is None:
        raise ValueError(f"unknown open_clip model {spec.model!r}; see open_clip.list_models()")
    return int(cfg["embed_dim"])
