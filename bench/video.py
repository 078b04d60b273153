#!/usr/bin/env python
"""Clips in a person's style (serving/clips.py): does every frame keep the person's style, and do the
frames hold together? Side by side in one run, on the same people, prompts, seeds and motion:

  consistent   the serving generator's clips (serving/clips.py): the first frame made as a still, its
               latents moved along the pan and decoded wrapping around
  independent  the same frames made as separate stills (a seed each), the same person and prompt

People: one per synthetic look (bench/personalization.py's, with their styles computed as ingestion
computes them). Each person gets a clip per prompt, panning right; it measures:

  frame_retrieval_accuracy  share of the clips' frames whose nearest person (by style) is their own
  flicker                   mean absolute difference between consecutive frames (0-1 pixel values),
                            after undoing the pan, which is known exactly (a roll); flicker_ratio:
                            consistent / independent
  warp_error                mean absolute difference between each frame and the first, the motion
                            undone; warp_error_ratio: consistent / independent
  cost_per_frame_ratio      a clip's time per frame over a still's time, the same size and steps, the
                            same batch size in rows, timed in turn

Default: the tiny trained models, 20 steps, guidance 4 (as bench/personalization.py). Final line: one
JSON object with those figures and the number of people, frames and steps. Targets:
frame_retrieval_accuracy >= 0.9, flicker_ratio <= 0.3, warp_error_ratio <= 0.5, cost_per_frame_ratio
<= 1.5. A pan is undone exactly, so flicker and warp error are 0 when a clip is one picture rolled;
zooms (refined with cross-frame attention) have no exact inverse and are not measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
from personalization import PROMPTS, people_styles, retrieval, style_targets
from tqdm import tqdm

from stylestream.models.clip import clip_spec
from stylestream.models.diffusion import diffusion_spec
from stylestream.schemas.events import ClipRequest, GenerationRequested
from stylestream.serving.clips import undo_motion
from stylestream.serving.generator import StyleGenerator
from stylestream.transforms.embed import OpenClipImageHandler

MOTION = "pan_right"


def request(person: str, prompt_index: int, a, seed: int, clip: ClipRequest | None) -> GenerationRequested:
    rid = f"{person}-{prompt_index}-{seed}-{'clip' if clip else 'still'}"
    return GenerationRequested(event_id=rid, user_id=person, event_time=datetime.now(UTC), request_id=rid,
                               prompt=PROMPTS[prompt_index], seed=seed, facet="overall", width=a.size,
                               height=a.size, num_inference_steps=a.steps, guidance_scale=a.guidance, clip=clip)


def pixels(frames: list) -> np.ndarray:
    return np.stack([np.asarray(f, np.float32) / 255 for f in frames])


def steadiness(frames: np.ndarray, scale: int) -> tuple[float, float]:
    """(flicker, warp_error) of a clip's frames, the pan undone."""
    still = np.stack([undo_motion(f, MOTION, k, scale) for k, f in enumerate(frames)])
    return float(np.abs(np.diff(still, axis=0)).mean()), float(np.abs(still[1:] - still[0]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=12, help="photos in each person's library (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=2, help=f"prompts per person, at most {len(PROMPTS)}")
    ap.add_argument("--frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="frame side in pixels (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s)")
    ap.add_argument("--guidance", type=float, default=4.0, help="the prompt's guidance scale (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds for the cost (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the people's photo libraries")
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="video-"))
    models = Path(os.environ.get("STYLESTREAM_MODELS", work / "models"))
    clip = clip_spec(models, "stylestream-tiny-clip", None)
    handler = OpenClipImageHandler(clip, device=a.device)
    clip_model = handler.load_model()

    # 1. The people and their styles, as the personalization bench makes them
    styles = people_styles(work, handler, clip_model, a.photos, a.seed)
    people, space, targets = style_targets(styles)
    gen = StyleGenerator(diffusion_spec(clip.pretrained), clip, a.device)
    scale = gen.pipe.vae_scale_factor
    shot = ClipRequest(frames=a.frames, fps=8, motion=MOTION)

    # 2. Each person's clips (two people's clips per call, as a worker mixes them) and the same frames
    #    as independent stills
    frame_images, frame_requests, measures = [], [], {"consistent": [], "independent": []}
    jobs = [(p, i) for i in range(a.prompts) for p in people]
    for start in tqdm(range(0, len(jobs), 2), desc="clips", unit="pair"):
        pair = [request(p, i, a, 1000 + i, shot) for p, i in jobs[start:start + 2]]
        clips = gen.generate_batch(pair, [gen.condition(r, styles[r.user_id]) for r in pair])
        for r, frames in zip(pair, clips, strict=True):
            frame_images += frames
            frame_requests += [r] * len(frames)
            measures["consistent"].append(steadiness(pixels(frames), scale))
            stills = [request(r.user_id, PROMPTS.index(r.prompt), a, 1000 + k, None) for k in range(a.frames)]
            alone = gen.generate_batch(stills, [gen.condition(s, styles[s.user_id]) for s in stills])
            # the stills do not move: put the pan in them as the clip has it, so only the content differs
            moved = [np.roll(x, (0, -k * scale), axis=(0, 1)) for k, x in enumerate(pixels(alone))]
            measures["independent"].append(steadiness(np.stack(moved), scale))
    hits, _, _ = retrieval(handler, clip_model, space, targets, people, frame_images, frame_requests)
    flicker = {k: float(np.mean([m[0] for m in v])) for k, v in measures.items()}
    warp = {k: float(np.mean([m[1] for m in v])) for k, v in measures.items()}

    # 3. Cost: one clip of `frames` frames against `frames` stills of other people, timed in turn
    clip_req = [request(people[0], 0, a, 1, shot)]
    still_reqs = [request(people[k % len(people)], 0, a, k, None) for k in range(a.frames)]
    calls = {"clip": (clip_req, [gen.condition(clip_req[0], styles[people[0]])]),
             "stills": (still_reqs, [gen.condition(r, styles[r.user_id]) for r in still_reqs])}
    seconds = {name: [] for name in calls}
    for _ in range(a.reps + 1):
        for name, (reqs, conds) in calls.items():
            t = time.perf_counter()
            gen.generate_batch(reqs, conds)
            seconds[name].append(time.perf_counter() - t)
    cost = min(seconds["clip"][1:]) / min(seconds["stills"][1:])  # first round: warm-up

    print(json.dumps({
        "bench": "video", "people": len(people), "clips": len(jobs), "frames": a.frames, "steps": a.steps,
        "size": a.size, "motion": MOTION, "frame_retrieval_accuracy": round(hits, 4),
        "flicker": {k: round(v, 4) for k, v in flicker.items()},
        "flicker_ratio": round(flicker["consistent"] / flicker["independent"], 4),
        "warp_error": {k: round(v, 4) for k, v in warp.items()},
        "warp_error_ratio": round(warp["consistent"] / warp["independent"], 4),
        "cost_per_frame_ratio": round(cost, 3), "chance": round(1 / len(people), 4),
        "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
