"""Style-conditioned generation: a user's style vector -> the IP-Adapter image embedding -> an image."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from stylestream.models.diffusion import DiffusionSpec, adapter_input_dim, load_pipeline
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES


def style_condition(vector: StyleVectorUpdated, dim: int) -> np.ndarray:
    """The adapter input for a style: the embedding, followed by the features when the adapter's
    projection was made for both (its input size says which)."""
    emb = np.asarray(vector.embedding, np.float32)
    if dim == len(emb):
        return emb
    feats = np.array([vector.features[n] for n in FEATURE_NAMES], np.float32)
    if dim == len(emb) + len(feats):
        return np.concatenate([emb, feats])
    raise ValueError(f"style adapter takes {dim}-d input; style vectors have {len(emb)}-d embeddings "
                     f"and {len(feats)} features: configure an adapter trained for this embedding model")


class StyleGenerator:
    def __init__(self, spec: DiffusionSpec, device: str | None = None):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_pipeline(spec, self.device)
        self.style_dim = adapter_input_dim(self.pipe)

    def generate(self, request: GenerationRequested, style: StyleVectorUpdated | None) -> Image.Image:
        """One image; with no style (or strength 0) exactly the unpersonalized image for the same seed."""
        cond = torch.zeros(self.style_dim)
        strength = 0.0
        if style is not None and not style.tombstone:
            cond = torch.from_numpy(style_condition(style, self.style_dim))
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
        return out.images[0]
