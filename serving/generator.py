"""Style-conditioned generation: a user's style vector -> the IP-Adapter image embedding -> an image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from stylestream.models.clip import ClipSpec, load_clip
from stylestream.models.diffusion import DiffusionSpec, adapter_input_dim, load_pipeline
from stylestream.schemas.events import GenerationRequested, StyleFacet, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
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


class StyleGenerator:
    """The diffusion pipeline with its style adapter, and the CLIP text tower that matches prompts to
    style facets in the space the photos were embedded in."""

    def __init__(self, spec: DiffusionSpec, clip: ClipSpec, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_pipeline(spec, self.device)
        self.style_dim = adapter_input_dim(self.pipe)
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

    def generate(self, request: GenerationRequested,
                 style: StyleVectorUpdated | None) -> tuple[Image.Image, int | None]:
        """One image and the facet used; with no style (or strength 0) exactly the unpersonalized
        image for the same seed."""
        cond = torch.zeros(self.style_dim)
        strength, facet = 0.0, None
        if style is not None and not style.tombstone:
            facet = self.pick_facet(request, style)
            chosen = style if facet is None else style.facets[facet]
            cond = torch.from_numpy(style_condition(chosen, self.style_dim))
            strength = request.style_strength
        embeds = cond.view(1, 1, -1).to(self.device, self.pipe.unet.dtype)
        if request.guidance_scale > 1.0:  # classifier-free guidance: [unconditional, conditional]
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        self.pipe.set_ip_adapter_scale(strength)
        generator = torch.Generator("cpu").manual_seed(request.seed)
        out = self.pipe(
            prompt=request.prompt, negative_prompt=request.negative_prompt or None,
            num_inference_steps=request.num_inference_steps, guidance_scale=request.guidance_scale,
            width=request.width, height=request.height, ip_adapter_image_embeds=[embeds],
            generator=generator, output_type="pil",
        )
        return out.images[0], facet
