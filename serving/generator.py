"""Style-conditioned generation: a user's style vector -> the IP-Adapter image embedding -> an image."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from stylestream.models.clip import ClipSpec, load_clip
from stylestream.models.diffusion import (
    DiffusionSpec,
    StyleImg2ImgPipeline,
    adapter_input,
    adapter_input_dim,
    load_pipeline,
)
from stylestream.models.hyper_lora import HyperLora
from stylestream.schemas.events import GenerationRequested, StyleFacet, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.clips import (
    PANS,
    REFINED_MOTIONS,
    circular_decoding,
    clip_frames,
    install_cross_frame_attention,
    refine_strength,
    start_strength,
)
from stylestream.serving.lora import LoraSource, UserLoras

log = logging.getLogger(__name__)


def style_condition(style: StyleVectorUpdated | StyleFacet, dim: int) -> np.ndarray:
    """The adapter input for a style (or one facet of it)."""
    return adapter_input(np.asarray(style.embedding, np.float32),
                         np.array([style.features[n] for n in FEATURE_NAMES], np.float32), dim)


@dataclass(frozen=True)
class Conditioning:
    embedding: np.ndarray  # the style adapter's input
    strength: float  # the style adapter's strength for this sample
    facet: int | None
    lora: LoraSource | None = None  # the LoRA adapter for this sample, if any
    start: Image.Image | None = None  # a clip's starting image, at the request's size


class StyleGenerator:
    """The diffusion pipeline with its style adapter, and the CLIP text tower that matches prompts to
    style facets in the space the photos were embedded in."""

    def __init__(self, spec: DiffusionSpec, clip: ClipSpec, device: str | None = None,
                 lora_dir: Path | None = None, max_loras: int = 8, use_ip_adapter: bool = True):
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.pipe = load_pipeline(spec, self.device)
        self.refine = StyleImg2ImgPipeline(**self.pipe.components)  # the same modules: clips' refinement
        self.refine.set_progress_bar_config(disable=True)
        self.frame_anchors = install_cross_frame_attention(self.pipe.unet)  # inert unless a call has anchors
        self.style_dim = adapter_input_dim(self.pipe)
        self.loras = UserLoras(self.pipe.unet, lora_dir, max_loras)
        # On the device and in the UNet's dtype once, so that every person's deltas share its A (one
        # `x @ A^T` per batch).
        self.hyper = HyperLora.load(spec.hyper_lora).to(self.device, self.pipe.unet.dtype) if spec.hyper_lora else None
        if self.hyper is not None and self.hyper.input_dim != self.style_dim:
            raise ValueError(f"the hyper-LoRA takes {self.hyper.input_dim}-d styles, the style adapter "
                             f"{self.style_dim}-d: they must be trained together")
        self.use_ip_adapter = use_ip_adapter  # off only to measure the hyper-LoRA alone
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
        embedding = style_condition(style if facet is None else style.facets[facet], self.style_dim)
        return Conditioning(embedding, request.style_strength if self.use_ip_adapter else 0.0, facet,
                            self.lora_for(request, style, facet, embedding))

    def lora_for(self, request: GenerationRequested, style: StyleVectorUpdated, facet: int | None,
                 embedding: np.ndarray) -> LoraSource | None:
        """The user's own LoRA file if they have one, else the hyper-LoRA's adapter for this style
        version, facet and strength; none at strength 0 (no personalization at all)."""
        strength = request.style_strength
        if strength == 0:
            return None
        if self.loras.has(request.user_id):
            return self.loras.of_user(request.user_id)
        if self.hyper is None or request.style_layers_only:  # its deltas reach every block, not only style ones
            return None
        key = f"hyper/{request.user_id}/v{style.version}/{'overall' if facet is None else facet}/{strength:g}"
        return LoraSource(key, request.user_id, lambda: self.hyper.low_rank(embedding, strength), style.version)

    def generate(self, request: GenerationRequested,
                 style: StyleVectorUpdated | None) -> tuple[Image.Image | list[Image.Image], int | None]:
        """One image (a clip request's frames) and the facet used; with no style (or strength 0) exactly
        the unpersonalized image for the same seed."""
        cond = self.condition(request, style)
        return self.generate_batch([request], [cond])[0], cond.facet

    def generate_batch(self, requests: list[GenerationRequested], conds: list[Conditioning],
                       on_preview: Callable[[int, int, int, Image.Image], None] | None = None,
                       ) -> list[Image.Image | list[Image.Image]]:
        """One diffusion call for requests of one `batch_key`, each sample with its own prompt, seed,
        style embedding and style strength: an image per request, or a clip request's frames (made
        consistent as serving/clips.py says, in one more call for the batch's clips). Requests that ask
        for `partial_images` get them through `on_preview(request index, index, steps done, image)` as
        the steps pass."""
        if len({batch_key(r) for r in requests}) != 1:
            raise ValueError("a batch takes requests of one size, step count and guidance scale")
        first = requests[0]
        # 1. Every still, and every clip's first frame, one row each: from noise, or from the clip's
        #    starting image (image-to-image)
        fresh = [i for i, c in enumerate(conds) if c.start is None]
        started = [i for i, c in enumerate(conds) if c.start is not None]
        first_rows: dict[int, torch.Tensor] = {}  # request index -> its latents
        if fresh:
            previews = self._previews([requests[i] for i in fresh], lambda row, *a: on_preview(fresh[row], *a)
                                      ) if on_preview else None
            made = self._call(self.pipe, [requests[i] for i in fresh], [conds[i] for i in fresh], width=first.width,
                              height=first.height, callback_on_step_end=previews)
            first_rows.update(zip(fresh, made, strict=True))
        if started:
            made = self._call(self.refine, [requests[i] for i in started], [conds[i] for i in started],
                              image=[conds[i].start for i in started],
                              strength=start_strength(first.num_inference_steps))
            first_rows.update(zip(started, made, strict=True))
        latents = torch.stack([first_rows[i] for i in range(len(requests))])
        stills = [i for i, r in enumerate(requests) if r.clip is None]
        images: list = [None] * len(requests)
        for i, image in zip(stills, self._decode(latents[stills]) if stills else [], strict=True):
            images[i] = image
        clips = [i for i, r in enumerate(requests) if r.clip is not None]
        if clips:
            # 2. Each clip's first frame moved along its motion, frame by frame
            moved = [clip_frames(latents[i:i + 1], requests[i].clip) for i in clips]
            # 3. Zooms' frames refined together, each frame attending to its clip's first frame
            zooms = [n for n, i in enumerate(clips) if requests[i].clip.motion in REFINED_MOTIONS]
            strength = refine_strength(first.num_inference_steps)
            if zooms and strength is not None:
                rows = [clips[n] for n in zooms for _ in range(len(moved[n]))]
                starts = np.cumsum([0] + [len(moved[n]) for n in zooms])[:-1].tolist()
                anchors = torch.tensor([start for n, start in zip(zooms, starts, strict=True)
                                        for _ in range(len(moved[n]))], device=self.device)
                refined = self._call(self.refine, [requests[i] for i in rows], [conds[i] for i in rows], anchors,
                                     image=torch.cat([moved[n] for n in zooms]), strength=strength)
                for n, start in zip(zooms, starts, strict=True):
                    moved[n] = refined[start:start + len(moved[n])]
            # 4. Pans decoded with the picture wrapping around, so each frame is the first one, rolled
            for i, frames in zip(clips, moved, strict=True):
                images[i] = self._decode(frames, circular=requests[i].clip.motion in PANS)
        return images

    def _call(self, pipe: DiffusionPipeline, rows: list[GenerationRequested], conds: list[Conditioning],
              anchors: torch.Tensor | None = None, **call_args) -> torch.Tensor:
        """The latents of one call of `pipe` (text-to-image, or the refinement's image-to-image), one row
        per request with its own prompt, seed, style and LoRA; with `anchors`, each row's self-attention
        reads the row named there."""
        first, dtype = rows[0], self.pipe.unet.dtype
        embeds = torch.from_numpy(np.stack([c.embedding for c in conds]))[:, None, :].to(self.device, dtype)
        strengths = torch.tensor([c.strength for c in conds])
        cfg = first.guidance_scale > 1.0
        if cfg:  # classifier-free guidance rows: [without the prompt..., with it...], both with the style, so
            # the guidance scale is the prompt's and the style keeps its own (strength): training drops them
            # independently, and guiding both at once lets the style drown the prompt's content.
            embeds, strengths = torch.cat([embeds, embeds]), torch.cat([strengths, strengths])
            anchors = torch.cat([anchors, anchors + len(rows)]) if anchors is not None else None
        # Per-sample strength: the adapter's output is scaled by a constant mask per row.
        masks = strengths.view(-1, 1, 1, 1).expand(
            -1, 1, first.height // self.pipe.vae_scale_factor, first.width // self.pipe.vae_scale_factor)
        negative = [r.negative_prompt for r in rows] if any(r.negative_prompt for r in rows) else None
        adapters = self.loras.adapters([c.lora for c in conds]) if any(c.lora for c in conds) else None
        per_sample = self.loras.per_sample(adapters + adapters if cfg else adapters) if adapters else \
            contextlib.nullcontext()
        self.pipe.set_ip_adapter_scale(style_layers(self.pipe.unet) if first.style_layers_only else 1.0)
        self.frame_anchors.rows = anchors
        try:
            with per_sample:
                return pipe(
                    prompt=[r.prompt for r in rows], negative_prompt=negative,
                    num_inference_steps=first.num_inference_steps, guidance_scale=first.guidance_scale,
                    ip_adapter_image_embeds=[embeds],
                    cross_attention_kwargs={"ip_adapter_masks": [masks.to(self.device, dtype)]},
                    generator=[torch.Generator("cpu").manual_seed(r.seed) for r in rows], output_type="latent",
                    **call_args,
                ).images
        finally:
            self.frame_anchors.rows = None

    def _decode(self, latents: torch.Tensor, circular: bool = False) -> list[Image.Image]:
        """Latents as images, as the pipeline's last step decodes them (`circular`: as a clip's frames are)."""
        vae = self.pipe.vae
        with torch.inference_mode(), circular_decoding(vae) if circular else contextlib.nullcontext():
            decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return self.pipe.image_processor.postprocess(decoded, output_type="pil")

    def _previews(self, requests: list[GenerationRequested], on_preview: Callable) -> Callable | None:
        """A step-end callback that decodes the latents where some request wants a preview."""
        wanted = {row: preview_steps(r.num_inference_steps, r.partial_images) for row, r in enumerate(requests)}
        if not any(wanted.values()):
            return None

        def on_step_end(pipe, step: int, _timestep, kwargs: dict) -> dict:
            rows = [row for row, steps in wanted.items() if step in steps]
            if rows:
                try:  # the latents so far, decoded as the final step decodes them (one row per request)
                    previews = self._decode(kwargs["latents"][rows])
                except (RuntimeError, ValueError):  # out of memory, say: the images matter, not previews
                    log.exception("could not decode previews at step %d; going on without", step)
                    wanted.clear()
                    return kwargs
                for row, image in zip(rows, previews, strict=True):
                    on_preview(row, wanted[row].index(step), step + 1, image)
            return kwargs
        return on_step_end


def preview_steps(steps: int, previews: int) -> list[int]:
    """The step indices after which to decode `previews` previews, evenly spaced, never the last step
    (that one is the image itself): 4 steps, 2 previews -> [0, 1]."""
    return sorted({(i + 1) * steps // (previews + 1) - 1 for i in range(previews)} & set(range(steps - 1)))


def batch_key(request: GenerationRequested) -> tuple[int, int, int, float, bool]:
    """Requests with the same key can share one diffusion call."""
    return (request.width, request.height, request.num_inference_steps, request.guidance_scale,
            request.style_layers_only)


def style_layers(unet) -> dict:
    """IP-Adapter scales that inject style only into the style layers: as InstantStyle, the first
    up block with cross-attention (up_blocks.0 in SDXL, up_blocks.1 in SD 1.5); every other layer 0."""
    first = next(i for i, t in enumerate(unet.config.up_block_types) if "CrossAttn" in t)
    return {"up": {f"block_{first}": 1.0}}


def choose_facet(text_embedding: np.ndarray, facet_embeddings: list[np.ndarray]) -> int | None:
    """The facet whose image embedding is closest (cosine) to the prompt's text embedding in the same
    CLIP space; None when there is nothing to choose between."""
    if len(facet_embeddings) < 2:
        return None
    t = text_embedding / (np.linalg.norm(text_embedding) or 1.0)
    return int(np.argmax([float(t @ (e / (np.linalg.norm(e) or 1.0))) for e in facet_embeddings]))
