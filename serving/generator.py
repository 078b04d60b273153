"""Style-conditioned generation: a user's style vector -> the IP-Adapter image embedding -> an image."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylestream.models.clip import ClipSpec, load_clip
from stylestream.models.diffusion import DiffusionSpec, adapter_input_dim, load_pipeline
from stylestream.schemas.events import GenerationRequested, StyleFacet, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.lora import UserLoras
from stylestream.transforms.facets import choose_facet


def style_condition(style: StyleVectorUpdated | StyleFacet, dim: int) -> np.ndarray:
    """The adapter input for a style (or one facet of it): the embedding, followed by the features
    when the adapter's projection was made for both (its input size says which)."""
    emb = np.asarray(style.embedding, np.float32)
    if dim == len(emb):
        return emb
    feats = np.array([style.features[n] for n in FEATURE_NAMES], np.float32)
    if dim == len(emb) + len(feats):
        return np.concatenate([emb, feats])
    raise ValueError(f"style adapter takes {dim}-d input; style vectors have {len(emb)}-d embeddings "
                     f"and {len(feats)} features: configure an adapter trained for this embedding model")


@dataclass(frozen=True)
class Conditioning:
    embedding: np.ndarray  # the style adapter's input
    strength: float
    facet: int | None
    lora_user: str | None = None  # whose LoRA adapter applies to this sample, if any


class StyleGenerator:
    """The diffusion pipeline with its style adapter, and the CLIP text tower that matches prompts to
    style facets in the space the photos were embedded in."""

    def __init__(self, spec: DiffusionSpec, clip: ClipSpec, device: str | None = None,
                 lora_dir: Path | None = None, max_loras: int = 8):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_pipeline(spec, self.device)
        self.style_dim = adapter_input_dim(self.pipe)
        self.loras = UserLoras(self.pipe, lora_dir, max_loras)
        self._clip, _, self._tokenize = load_clip(clip, self.device)

    def embed_prompt(self, prompt: str) -> np.ndarray:
        with torch.inference_mode():
            t = self._clip.encode_text(self._tokenize([prompt]).to(self.device))
        return torch.nn.functional.normalize(t.float(), dim=-1)[0].cpu().numpy()

    def pick_facet(self, request: GenerationRequested, style: StyleVectorUpdated) -> int | None:
        """The facet to condition on, or None for the overall style."""
        if request.facet == "overall" or not style.facets:
            return None
        if request.facet == "auto":
            return choose_facet(self.embed_prompt(request.prompt), [np.asarray(f.embedding) for f in style.facets])
        if request.facet >= len(style.facets):
            raise ValueError(f"facet {request.facet} asked for, style version {style.version} has "
                             f"{len(style.facets)}")
        return request.facet

    def condition(self, request: GenerationRequested, style: StyleVectorUpdated | None) -> Conditioning:
        """What conditions one request's sample; ValueError if the request cannot be met."""
        if style is None or style.tombstone:
            return Conditioning(np.zeros(self.style_dim, np.float32), 0.0, None)
        facet = self.pick_facet(request, style)
        chosen = style if facet is None else style.facets[facet]
        # A user's LoRA applies whenever their style does (strength 0 means no personalization at all).
        lora = request.user_id if request.style_strength > 0 and self.loras.has(request.user_id) else None
        return Conditioning(style_condition(chosen, self.style_dim), request.style_strength, facet, lora)

    def generate(self, request: GenerationRequested,
                 style: StyleVectorUpdated | None) -> tuple[Image.Image, int | None]:
        """One image and the facet used; with no style (or strength 0) exactly the unpersonalized
        image for the same seed."""
        cond = self.condition(request, style)
        return self.generate_batch([request], [cond])[0], cond.facet

    def generate_batch(self, requests: list[GenerationRequested], conds: list[Conditioning]) -> list[Image.Image]:
        """One diffusion call for requests of one `batch_key`, each sample with its own prompt, seed,
        style embedding and style strength."""
        if len({batch_key(r) for r in requests}) != 1:
            raise ValueError("a batch takes requests of one size, step count and guidance scale")
        first, dtype = requests[0], self.pipe.unet.dtype
        embeds = torch.from_numpy(np.stack([c.embedding for c in conds]))[:, None, :].to(self.device, dtype)
        strengths = torch.tensor([c.strength for c in conds])
        cfg = first.guidance_scale > 1.0
        if cfg:  # classifier-free guidance rows: [unconditional..., conditional...]
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
            strengths = torch.cat([strengths, strengths])
        # Per-sample strength: the adapter's output is scaled by a constant mask per row.
        masks = strengths.view(-1, 1, 1, 1).expand(-1, 1, first.height // 8, first.width // 8)
        negative = [r.negative_prompt for r in requests] if any(r.negative_prompt for r in requests) else None
        # Once any LoRA is loaded, every row names its adapter (or none), or peft would apply them all.
        adapters = self.loras.adapters([c.lora_user for c in conds]) if self.loras.loaded() or any(
            c.lora_user for c in conds) else None
        per_sample = self.loras.per_sample(adapters * (2 if cfg else 1)) if adapters else contextlib.nullcontext()
        self.pipe.set_ip_adapter_scale(style_layers(self.pipe.unet) if first.style_layers_only else 1.0)
        with per_sample:
            out = self.pipe(
                prompt=[r.prompt for r in requests], negative_prompt=negative,
                num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                width=first.width, height=first.height, ip_adapter_image_embeds=[embeds],
                cross_attention_kwargs={"ip_adapter_masks": [masks.to(self.device, dtype)]},
                generator=[torch.Generator("cpu").manual_seed(r.seed) for r in requests], output_type="pil",
            )
        return out.images


def batch_key(request: GenerationRequested) -> tuple[int, int, int, float, bool]:
    """Requests with the same key can share one diffusion call."""
    return (request.width, request.height, request.num_inference_steps, request.guidance_scale,
            request.style_layers_only)


def style_layers(unet) -> dict:
    """IP-Adapter scales that inject style only into the style layers: as InstantStyle, the first
    up block with cross-attention (up_blocks.0 in SDXL, up_blocks.1 in SD 1.5); every other layer 0."""
    first = next(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    return {"up": {f"block_{first}": 1.0}}
