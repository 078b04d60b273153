"""Short clips from an image model, without video training: every frame is an image of the same
person's style, kept consistent by what needs no training.

1. One picture, moved: the clip's first frame is made as a still is (the same batch as other people's
   stills); its latents are then moved along the camera motion frame by frame (a pan rolls them, a
   zoom scales them), so each frame's layout is the first frame's, moved exactly as asked.
2. A pan decoded wrapping around: the VAE decodes a pan's frames with its convolutions' padding
   wrapping around (circular), so decoding a rolled latent gives the rolled picture exactly and the
   frame's edges do not flicker as the picture passes them (the first frame was not made to tile, so
   where its two sides meet shows as that place crosses the frame).
3. A zoom's frames, resampled and so blurred, are refined: noised again with one noise shared by all
   frames to the level of the last denoising step and denoised through it (img2img on the latents),
   with cross-frame attention (each frame's self-attention takes its keys and values from the clip's
   first frame, as Text2Video-Zero does) and the person's conditioning on every frame. More steps
   redraw the picture where the prompt says things belong and lose the motion (with the tiny model, 5
   of 20 steps put a panned house back in the centre); on pans even the one step flickered more than
   none (0.022 against 0.015 with the pan undone, three clips, zero-padded decoding), so pans are not
   refined.

A clip asked to start from an image begins with that image redrawn in the person's style
(image-to-image from it, START_STRENGTH of the schedule) instead of from noise; the rest is the same.

What moves is the camera, not the scene. A clip is written as H.264 MP4 with PyAV (its wheels bring
their own FFmpeg).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator, Sequence

import av
import numpy as np
import torch
from PIL import Image

from stylestream.schemas.events import ClipRequest

PAN_LATENT_PX = 1  # a pan moves the picture one latent pixel (8 image pixels at SD's scale) per frame
ZOOM_PER_FRAME = 0.04  # a zoom scales the picture by 4% per frame
REFINE_STEPS = 1  # the last steps of the schedule, run again on the moved frames
REFINED_MOTIONS = ("zoom_in", "zoom_out")  # resampling blurs; a pan is exact as it is
START_STRENGTH = 0.75  # how much of the schedule redraws a starting image: its layout stays, the style is new
PANS = {"pan_left": (0, 1), "pan_right": (0, -1), "pan_up": (1, 0), "pan_down": (-1, 0)}  # (rows, cols) moved


def moved(latents: torch.Tensor, motion: str, frame: int) -> torch.Tensor:
    """(1, C, h, w) latents as the camera sees them `frame` frames into `motion`: a pan rolls them (what
    leaves one side comes back on the other, so a pan is undone exactly), a zoom resamples them
    bilinearly about the centre (mirrored beyond the edges when zooming out)."""
    if motion == "none" or frame == 0:
        return latents
    if motion in PANS:
        dy, dx = PANS[motion]
        return torch.roll(latents, (dy * frame * PAN_LATENT_PX, dx * frame * PAN_LATENT_PX), dims=(-2, -1))
    scale = (1 + ZOOM_PER_FRAME) ** (frame if motion == "zoom_in" else -frame)
    theta = torch.tensor([[[1 / scale, 0, 0], [0, 1 / scale, 0]]], dtype=torch.float32, device=latents.device)
    grid = torch.nn.functional.affine_grid(theta, list(latents.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(latents.float(), grid, mode="bilinear", padding_mode="reflection",
                                          align_corners=False)
    return out.to(latents.dtype)


@contextlib.contextmanager
def circular_decoding(vae: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The VAE's decoder with its convolutions' padding wrapping around, for the duration."""
    convs = [m for m in vae.decoder.modules() if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0)]
    before = [c.padding_mode for c in convs]
    for c in convs:
        c.padding_mode = "circular"
    try:
        yield vae
    finally:
        for c, mode in zip(convs, before, strict=True):
            c.padding_mode = mode


def refine_strength(steps: int) -> float | None:
    """img2img's strength that runs the schedule's last REFINE_STEPS steps; None when the schedule is
    no longer than that (the moved frames are then the clip)."""
    if steps <= REFINE_STEPS:
        return None
    return (REFINE_STEPS + 0.5) / steps  # img2img runs int(steps * strength) steps


def start_strength(steps: int) -> float:
    """img2img's strength from a starting image: START_STRENGTH of the schedule, at least one step (a
    one-step schedule is all of it: little of the image is left)."""
    return min(1.0, max(START_STRENGTH, 1.5 / steps))


def clip_frames(first: torch.Tensor, clip: ClipRequest) -> torch.Tensor:
    """(frames, C, h, w): the first frame's (1, C, h, w) latents moved along the clip's motion."""
    return torch.cat([moved(first, clip.motion, k) for k in range(clip.frames)])


def undo_motion(image: np.ndarray, motion: str, frame: int, vae_scale: int) -> np.ndarray:
    """An (h, w, c) frame moved back to where the first frame is, for pans (known exactly: a roll)."""
    if motion not in PANS:
        raise ValueError(f"{motion}: only pans are undone exactly")
    dy, dx = PANS[motion]
    shift = frame * PAN_LATENT_PX * vae_scale
    return np.roll(image, (-dy * shift, -dx * shift), axis=(0, 1))


class FrameAnchors:
    """For the diffusion call in progress: each row's anchor row (its clip's first frame), or None
    outside a refinement call (attention is then exactly the plain model's)."""

    def __init__(self):
        self.rows: torch.Tensor | None = None


class CrossFrameAttention:
    """Wraps a self-attention processor: with anchors set, each row's keys and values come from its
    anchor row's hidden states (the wrapped processor computes keys and values from
    `encoder_hidden_states` when it is given, so its own code does the rest)."""

    def __init__(self, inner, anchors: FrameAnchors):
        self.inner, self.anchors = inner, anchors

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        rows = self.anchors.rows
        if rows is not None and encoder_hidden_states is None:
            encoder_hidden_states = hidden_states[rows]
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)


def install_cross_frame_attention(unet: torch.nn.Module) -> FrameAnchors:
    """Wraps every self-attention processor of the UNet (`attn1`), leaving cross-attention (the prompt's
    and the style adapter's) as it is; the returned anchors steer them."""
    anchors = FrameAnchors()
    unet.set_attn_processor({name: CrossFrameAttention(p, anchors) if name.endswith("attn1.processor") else p
                             for name, p in unet.attn_processors.items()})
    return anchors


def encode_mp4(frames: Sequence[Image.Image], fps: int) -> bytes:
    """H.264 MP4 (yuv420p, so every player plays it; sides rounded down to even numbers)."""
    width, height = (frames[0].width // 2) * 2, (frames[0].height // 2) * 2
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "18"}
        for frame in frames:
            pixels = np.asarray(frame.convert("RGB"))[:height, :width]
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(pixels), format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def decode_mp4(data: bytes) -> list[np.ndarray]:
    """The frames of an MP4, as (h, w, 3) uint8 arrays (for checks and benchmarks)."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
