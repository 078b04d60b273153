#!/usr/bin/env python
"""Does a generated image follow its person's style? Four variants side by side in one run, on the
same people, prompts and seeds:

  none        no personalization (strength ignored)
  ip_adapter  the style adapter only (IP-Adapter image projection + to_k_ip/to_v_ip)
  hyper_lora  the hyper-LoRA only (LoRA deltas made from the style vector, per sample through peft)
  both        both, as `stylestream serve` runs by default

People: one per synthetic look (warm, cool, mono, pastel, moody, green), each with their own photo
library (not the training images). Their styles come from the project's own embedding, feature and
style code, exactly as ingestion computes them. Each variant generates every person's images in
mixed-user batches through the serving generator, then measures each image with the same code:

  retrieval_accuracy   share of images whose nearest person (by style) is their own (chance 1/people)
  feature_correlation  mean over warmth, saturation, brightness, contrast, colourfulness of the
                       correlation between the person's value and the generated image's
  strength_sweep       mean style distance to the person at strengths 0, 0.25, 0.5, 0.75, 1
  images_per_s         at strength 1, adapters already made (steady serving); cost_ratio: its time per
                       image over that of `none`

Default: the tiny trained model (models/tiny_style.py), 20 denoising steps: at serving's default of
4 it draws the monochrome person's black and white shapes as muted grey, and their images are then
nearest the cool, muted person (retrieval 0.833 with both instead of 0.958; `--steps 4` shows it).
Real models: --diffusion-model, --ip-adapter, --hyper-lora, --clip-model, --clip-pretrained, as for
`stylestream serve`. Final line: one JSON object
{"people", "chance", "variants": {name: {...}}}. Targets with the tiny model: retrieval >= 0.9 with
both (about chance without), a falling strength sweep, cost <= 1.3x of none.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
import torch
from tqdm import tqdm

from stylestream.defaults import HALF_LIFE_DAYS
from stylestream.demo.synthetic import LOOKS, make_library
from stylestream.models.clip import clip_spec
from stylestream.models.diffusion import diffusion_spec
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import StyleGenerator
from stylestream.transforms.embed import OpenClipImageHandler, image_styles
from stylestream.transforms.facets import style_space
from stylestream.transforms.images import DecodeLimits, decode
from stylestream.transforms.style import photo_weight, stats_of
from stylestream.transforms.vectors import style_vector_event

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NAMED = ("warmth", "saturation", "brightness", "contrast", "colourfulness")
PROMPTS = ["a birthday card with a cake", "a mountain lake at dawn", "a bowl of fruit", "a city at night"]


def people_styles(work: Path, handler, clip_model, photos: int, seed: int) -> dict[str, StyleVectorUpdated]:
    """One person per look, their style computed from their own photos as ingestion would."""
    library = make_library(work / "library", {look: [("all", look, photos)] for look in sorted(LOOKS)},
                           seed=seed)
    styles = {}
    for person in sorted(LOOKS):
        mine = [p for p in library if p.user_id == person]
        images = [decode(p.path.read_bytes(), DecodeLimits())[0] for p in mine]
        emb, feats = image_styles(handler, clip_model, images)
        weights = np.array([photo_weight(p.taken_at, HALF_LIFE_DAYS) for p in mine])
        styles[person] = style_vector_event(person, 1, stats_of(emb, feats, weights), [], [], None,
                                             datetime.now(UTC))
    return styles


def requests_for(people: list[str], prompts: list[str], seeds: int, strength: float, a) -> list[GenerationRequested]:
    return [GenerationRequested(
        event_id=f"{p}-{pi}-{s}-{strength}", user_id=p, event_time=datetime.now(UTC),
        request_id=f"{p}-{pi}-{s}-{strength}", prompt=prompt, seed=1000 + s, style_strength=strength,
        facet="overall", width=a.size, height=a.size, num_inference_steps=a.steps, guidance_scale=a.guidance)
        for pi, prompt in enumerate(prompts) for s in range(seeds) for p in people]


def generate(gen: StyleGenerator, requests: list[GenerationRequested], styles: dict, batch: int) -> list:
    """Images for the requests, `batch` at a time (mixed users), as the serving worker batches them."""
    images = []
    for i in range(0, len(requests), batch):
        chunk = requests[i:i + batch]
        images += gen.generate_batch(chunk, [gen.condition(r, styles[r.user_id]) for r in chunk])
    return images


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=12, help="photos in each person's library (default: %(default)s)")
    ap.add_argument("--prompts", type=int, default=2, help=f"prompts per person, at most {len(PROMPTS)}")
    ap.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=6, help="images per diffusion call (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s; see above)")
    ap.add_argument("--guidance", type=float, default=0.0, help="classifier-free guidance (default: none)")
    ap.add_argument("--reps", type=int, default=4, help="timed rounds for images/s (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the people's photo libraries")
    ap.add_argument("--diffusion-model", default=None)
    ap.add_argument("--ip-adapter", default=None)
    ap.add_argument("--hyper-lora", default=None)
    ap.add_argument("--clip-model", default="stylestream-tiny-clip")
    ap.add_argument("--clip-pretrained", default=None)
    ap.add_argument("--device", default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="personalization-"))
    models = Path(os.environ.get("STYLESTREAM_MODELS", work / "models"))
    clip = clip_spec(models, a.clip_model, a.clip_pretrained)
    spec = diffusion_spec(models, clip.pretrained, a.diffusion_model, a.ip_adapter, a.hyper_lora)
    if spec.hyper_lora is None:
        raise SystemExit("the benchmark compares the hyper-LoRA too: give --hyper-lora")
    handler = OpenClipImageHandler(clip, device=a.device)
    clip_model = handler.load_model()

    # 1. The people and their styles
    styles = people_styles(work, handler, clip_model, a.photos, a.seed)
    people = sorted(styles)
    people_emb = np.stack([styles[p].embedding for p in people])
    people_feats = np.stack([[styles[p].features[n] for n in FEATURE_NAMES] for p in people])
    space = style_space(people_emb, people_feats)  # distances between styles, scaled by the people's spread
    targets = dict(zip(people, space(people_emb, people_feats), strict=True))

    # 2. The four variants: one pipeline with the hyper-LoRA, one without
    with_hyper = StyleGenerator(spec, clip, a.device)
    without = StyleGenerator(dataclasses.replace(spec, hyper_lora=None), clip, a.device)
    hyper_only = StyleGenerator(spec, clip, a.device, use_ip_adapter=False)
    none = StyleGenerator(dataclasses.replace(spec, hyper_lora=None), clip, a.device, use_ip_adapter=False)
    variants = {"none": none, "ip_adapter": without, "hyper_lora": hyper_only, "both": with_hyper}
    prompts = PROMPTS[:a.prompts]

    results = {}
    for name, gen in variants.items():
        # 3. The strength sweep; its last point, strength 1, also gives retrieval and correlation
        sweep = []
        for strength in tqdm(STRENGTHS, desc=f"{name}: strengths", unit="strength"):
            reqs = requests_for(people, prompts, a.seeds, strength, a)
            images = generate(gen, reqs, styles, a.batch)
            emb, feats = image_styles(handler, clip_model, images)
            points = space(emb, feats)
            owners = [r.user_id for r in reqs]
            sweep.append(float(np.mean([np.linalg.norm(x - targets[o]) for x, o in zip(points, owners, strict=True)])))
        # 4. Retrieval: is the nearest person the image's own?
        d = np.stack([np.linalg.norm(points - targets[p], axis=1) for p in people], 1)
        hits = [people[int(np.argmin(row))] == o for row, o in zip(d, owners, strict=True)]
        # 5. Feature fidelity: requested vs generated named features
        corr = {}
        for n in NAMED:
            i = FEATURE_NAMES.index(n)
            want = np.array([styles[o].features[n] for o in owners], np.float64)
            got = feats[:, i].astype(np.float64)
            # Images that differ only by float rounding (no personalization) have no correlation to speak of.
            corr[n] = float(np.corrcoef(want, got)[0, 1]) if got.std() > 1e-6 and want.std() > 1e-6 else 0.0
        results[name] = {"retrieval_accuracy": round(float(np.mean(hits)), 4),
                         "feature_correlation": round(float(np.mean(list(corr.values()))), 4),
                         "feature_correlations": {k: round(v, 4) for k, v in corr.items()},
                         "strength_sweep": [round(x, 4) for x in sweep],
                         "sweep_falls": all(later < earlier for earlier, later in itertools.pairwise(sweep))}
        print(json.dumps({"variant": name, **results[name]}), flush=True)

    # 6. Cost: strength 1 again, adapters already made (as a serving worker keeps them), the variants
    #    taking turns so that a slower moment of the machine does not fall on one of them
    reqs = requests_for(people, prompts, a.seeds, 1.0, a)
    seconds = dict.fromkeys(variants, 0.0)
    for _ in tqdm(range(a.reps), desc="timing, variants in turn", unit="round"):
        for name, gen in variants.items():
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            t = time.perf_counter()
            generate(gen, reqs, styles, a.batch)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - t
    for name in variants:
        results[name]["images_per_s"] = round(a.reps * len(reqs) / seconds[name], 2)
    for r in results.values():
        r["cost_ratio"] = round(results["none"]["images_per_s"] / r["images_per_s"], 3)
    print(json.dumps({
        "bench": "personalization", "model": spec.describe(), "device": with_hyper.device, "people": len(people),
        "chance": round(1 / len(people), 4), "images_per_strength": len(reqs), "size": a.size, "steps": a.steps,
        "seconds": round(time.perf_counter() - t0, 1), "variants": results}))


if __name__ == "__main__":
    main()
