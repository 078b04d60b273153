"""diffusers text-to-image pipeline with an IP-Adapter-format style adapter: one loading path.

Production names a diffusers model folder (e.g. a local copy of an SD-1.5 checkpoint) and an
IP-Adapter weight file whose image projection takes the style vector. The offline default is the
tiny style model trained on these machines (models/tiny_style.py, shipped in models/trained/);
tests build tiny random-weight pipelines (models/random_models.py), written once with
`save_pretrained` and loaded back here with `from_pretrained`, like real weights.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

CONFIG_DIR = Path(__file__).parent / "configs" / "diffusion"
IP_ADAPTER_FILE = "ip-adapter.safetensors"


@dataclass(frozen=True)
class DiffusionSpec:
    model_dir: str  # a diffusers StableDiffusionPipeline folder
    ip_adapter: str  # an IP-Adapter weight file (image_proj.* + ip_adapter.* tensors)
    hyper_lora: str | None = None  # a hyper-LoRA file (style vector -> per-user LoRA), optional

    def describe(self) -> str:
        return f"{self.model_dir} + {Path(self.ip_adapter).name}" + (
            f" + {Path(self.hyper_lora).name}" if self.hyper_lora else "")


def per_sample_ip_adapter_embeds(ip_adapter_image_embeds: list[torch.Tensor], device, batch: int,
                                  do_classifier_free_guidance: bool) -> list[torch.Tensor]:
    """IP-Adapter embeddings with one row per sample of the batch, each sample keeping its own.

    StableDiffusionPipeline (diffusers 0.42.1, huggingface/diffusers#9813) tiles the given embeddings
    by the batch size, so in a batch where every sample has its own style, every sample attends to
    every style. Here each sample's embedding is repeated in place instead.
    """
    out = []
    for embeds in ip_adapter_image_embeds:
        neg, pos = embeds.chunk(2) if do_classifier_free_guidance else (None, embeds)
        reps = batch // pos.shape[0]
        pos = pos.repeat_interleave(reps, dim=0)
        if neg is not None:
            pos = torch.cat([neg.repeat_interleave(reps, dim=0), pos])
        out.append(pos.to(device))
    return out


class StylePipeline(StableDiffusionPipeline):
    """StableDiffusionPipeline whose IP-Adapter embeddings stay per sample (see above)."""

    def prepare_ip_adapter_image_embeds(self, ip_adapter_image, ip_adapter_image_embeds, device,
                                        num_images_per_prompt, do_classifier_free_guidance):
        if ip_adapter_image_embeds is None:
            raise ValueError("the style adapter takes precomputed embeddings (ip_adapter_image_embeds)")
        # diffusers passes batch_size * num_images_per_prompt here
        return per_sample_ip_adapter_embeds(ip_adapter_image_embeds, device, num_images_per_prompt,
                                            do_classifier_free_guidance)


class StyleImg2ImgPipeline(StableDiffusionImg2ImgPipeline):
    """The image-to-image pipeline (a clip's refinement) with the same per-sample embeddings."""

    prepare_ip_adapter_image_embeds = StylePipeline.prepare_ip_adapter_image_embeds


def load_pipeline(spec: DiffusionSpec, device: str = "cpu", dtype: torch.dtype | None = None) -> StylePipeline:
    """The pipeline from a local folder, with the style adapter loaded and set to scale 1
    (per-sample strength goes through constant IP-Adapter masks). Half precision on a GPU unless
    `dtype` says otherwise (training keeps float32 weights)."""
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    diffusers_logging.disable_progress_bar()  # callers show their own progress
    pipe = StylePipeline.from_pretrained(
        spec.model_dir, dtype=dtype, safety_checker=None, requires_safety_checker=False,
        local_files_only=True,
    )
    adapter = Path(spec.ip_adapter)
    # image_encoder_folder=None: the style vector is computed by ingestion, not by an image encoder here.
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None,
                         local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def adapter_input(embedding: np.ndarray, features: np.ndarray, dim: int) -> np.ndarray:
    """What the style adapter (and the hyper-LoRA) take for a style: the embedding, followed by the
    aesthetic features when the adapter was made for both (`dim`, its input size, says which)."""
    emb = np.asarray(embedding, np.float32)
    if dim == len(emb):
        return emb
    if dim == len(emb) + len(features):
        return np.concatenate([emb, np.asarray(features, np.float32)])
    raise ValueError(f"style adapter takes {dim}-d input; style vectors have {len(emb)}-d embeddings "
                     f"and {len(features)} features: configure an adapter trained for this embedding model")


def adapter_input_dim(pipe) -> int:
    """Size of the vector the style adapter's image projection expects."""
    proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
    return int(proj.image_embeds.in_features)


def cross_attention_layers(unet) -> Iterator[tuple[int, str]]:
    """(IP-Adapter key, attention module name) of every cross-attention layer, in the order and with
    the odd numbering (1, 3, 5...) of the original IP-Adapter layout that diffusers' loader expects."""
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        yield key, name.removesuffix(".processor")
        key += 2


def ip_adapter_state_dict(unet) -> dict[str, torch.Tensor]:
    """The IP-Adapter loaded into `unet`, back in the original layout (what `load_ip_adapter` reads)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    sd = {"image_proj.proj.weight": proj.image_embeds.weight, "image_proj.proj.bias": proj.image_embeds.bias,
          "image_proj.norm.weight": proj.norm.weight, "image_proj.norm.bias": proj.norm.bias}
    for key, name in cross_attention_layers(unet):
        processor = unet.get_submodule(name).processor
        sd[f"ip_adapter.{key}.to_k_ip.weight"] = processor.to_k_ip[0].weight
        sd[f"ip_adapter.{key}.to_v_ip.weight"] = processor.to_v_ip[0].weight
    return {k: v.detach().float().cpu().contiguous() for k, v in sd.items()}


def diffusion_spec(clip_weights: str | None, model_dir: str | None = None,
                   ip_adapter: str | None = None, hyper_lora: str | None = None) -> DiffusionSpec:
    """What the command line asks for; by default the tiny trained style model (models/tiny_style.py),
    which needs the tiny CLIP weights it was trained with (`clip_weights`, a checkpoint path)."""
    if model_dir is None and ip_adapter is None:
        if hyper_lora is not None:
            raise ValueError("--hyper-lora needs the --diffusion-model and --ip-adapter it was trained with")
        from stylestream.models.tiny_style import ensure_tiny_style

        return ensure_tiny_style(clip_weights)
    if model_dir is None or ip_adapter is None:
        raise ValueError("a diffusion model folder needs its style adapter file too (and the other way round)")
    return DiffusionSpec(model_dir, ip_adapter, hyper_lora)
