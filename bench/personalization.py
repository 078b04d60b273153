#!/usr/bin/env python
"""Does a generated image follow its person's style? Four variants side by side in one run, on the
same people, prompts and seeds:

  none        no personalization (strength ignored)
  ip_adapter  the style adapter only (IP-Adapter image projection + to_k_ip/to_v_ip)
  hyper_lora  the hyper-LoRA only (LoRA deltas made from the style vector, added per sample)
  both        both, as `stylestream serve` runs by default

People: one per synthetic look, each photographing one subject only (cool: circles, green: squares,
mono: triangles, moody: stars, pastel: crosses, warm: rings), with their own photo library (not
the training images). Their styles come from the project's own embedding, feature and style code,
exactly as ingestion computes them. The prompts name a subject, a count and a place ("two stars on
the left"). Each variant generates every person's images in mixed-user batches through the serving
generator, then measures each image with the same code:

  retrieval_accuracy   share of images whose nearest person (by style) is their own (chance 1/people)
  content_accuracy     share of images that show the prompt's subject, by a small classifier trained
                       here on the renderer's labels (models/subject_classifier.py; content_chance 1/8)
  leakage_prompt_wins  the same, over the images whose person photographs another subject than the
                       prompt names: the prompt, not the person's subject matter, decides the content
  feature_correlation  mean over warmth, saturation, brightness, contrast, colourfulness of the
                       correlation between the person's value and the generated image's
  strength_sweep       mean style distance to the person at strengths 0, 0.25, 0.5, 0.75, 1
  images_per_s         at strength 1, adapters already made (steady serving); cost_ratio: its time per
                       image over that of `none`
  steps_4              retrieval, content and leakage again with 4 denoising steps (serving's default),
                       at the same guidance

and, once (it depends on the CLIP alone), facet_choice_accuracy: people with two tastes tied to two
subjects (a look photographing one subject, another look another); the share of prompts naming one
of the two subjects for which serving's "auto" facet is the facet of the photos that show it.

Default: the tiny trained models (models/tiny_style.py), 20 denoising steps (serving's default of 4
is measured as steps_4), the prompt's guidance scale 4 (the rows without the prompt keep the style;
a request's default is no guidance). Styles are compared in the facets' style space (facets.style_space:
embedding and features, composition left out).
Real models: --diffusion-model, --ip-adapter, --hyper-lora, --clip-model, --clip-pretrained, as for
`stylestream serve`. Final line: one JSON object
{"people", "chance", "content_chance", "facet_choice_accuracy", "variants": {name: {...}}}. Targets
with the tiny model, for both at 20 steps: retrieval, content, leakage and facet choice >= 0.9 (>= 0.8
at 4 steps), cost <= 1.15x of none; without personalization retrieval about chance and content as
high as with.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np
import torch
from tqdm import tqdm

from stylestream.defaults import HALF_LIFE_DAYS
from stylestream.demo.synthetic import LOOKS, SUBJECTS, every_scene, make_library
from stylestream.models.clip import clip_spec
from stylestream.models.diffusion import diffusion_spec
from stylestream.models.subject_classifier import train_subject_classifier
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import StyleGenerator
from stylestream.transforms.embed import OpenClipImageHandler, image_styles
from stylestream.transforms.facets import find_facets, style_space
from stylestream.transforms.images import DecodeLimits, decode
from stylestream.transforms.style import photo_weight, stats_of
from stylestream.transforms.vectors import style_vector_event

STRENGTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
NAMED = ("warmth", "saturation", "brightness", "contrast", "colourfulness")
# What the tiny models know words for (demo/synthetic.py): a subject, how many, where.
PROMPTS = ["two stars on the left", "one house in the centre", "three circles on the right", "one tree on the left"]


def person_subject(person: str) -> str:
    return SUBJECTS[sorted(LOOKS).index(person)]


def style_and_facets(photos: list, handler, clip_model) -> tuple[StyleVectorUpdated, list]:
    """A person's style, with its facets, from their photos, as ingestion computes them."""
    images = [decode(p.path.read_bytes(), DecodeLimits())[0] for p in photos]
    emb, feats = image_styles(handler, clip_model, images)
    weights = np.array([photo_weight(p.taken_at, HALF_LIFE_DAYS) for p in photos])
    facets = find_facets([p.photo_id for p in photos], emb, feats, weights)
    return style_vector_event(photos[0].user_id, 1, stats_of(emb, feats, weights), facets, [], None,
                              datetime.now(UTC)), facets


def people_styles(work: Path, handler, clip_model, photos: int, seed: int) -> dict[str, StyleVectorUpdated]:
    """One person per look, photographing one subject only; overall styles (no facets)."""
    library = make_library(work / "library", {
        look: [("all", look, photos, (person_subject(look),))] for look in sorted(LOOKS)}, seed=seed)
    styles = {}
    for person in sorted(LOOKS):
        style, _ = style_and_facets([p for p in library if p.user_id == person], handler, clip_model)
        styles[person] = style.model_copy(update={"facets": []})
    return styles


def style_targets(styles: dict[str, StyleVectorUpdated]) -> tuple[list[str], Callable, dict[str, np.ndarray]]:
    """The people, the space their styles are compared in (distances scaled by the people's spread),
    and each person's point in it."""
    people = sorted(styles)
    emb = np.stack([styles[p].embedding for p in people])
    feats = np.stack([[styles[p].features[n] for n in FEATURE_NAMES] for p in people])
    space = style_space(emb, feats)
    return people, space, dict(zip(people, space(emb, feats), strict=True))


def facet_choice_accuracy(work: Path, gen: StyleGenerator, handler, clip_model, photos: int, seed: int) -> float:
    """People with two tastes, each a look photographing its own subject; the share of prompts naming one
    of the two subjects whose "auto" facet is that subject's photos."""
    looks = sorted(LOOKS)
    pairs = [(looks[i], SUBJECTS[i], looks[(i + 2) % len(looks)], SUBJECTS[(i + 3) % len(SUBJECTS)])
             for i in range(len(looks))]
    library = make_library(work / "two-tastes", {
        f"p{i}": [("a", la, photos, (sa,)), ("b", lb, photos, (sb,))] for i, (la, sa, lb, sb) in enumerate(pairs)},
        seed=seed + 1)
    album_of = {p.photo_id: p.album_id for p in library}
    right = total = 0
    for i, (_, sa, _, sb) in enumerate(pairs):
        person = f"p{i}"
        style, facets = style_and_facets([p for p in library if p.user_id == person], handler, clip_model)
        for album, subject in (("a", sa), ("b", sb)):
            for scene in (s for s in every_scene() if s.subject == subject):
                prompt = scene.caption
                req = GenerationRequested(event_id=f"f{i}", user_id=person, event_time=datetime.now(UTC),
                                          request_id=f"f{i}", prompt=prompt, facet="auto")
                picked = gen.pick_facet(req, style)
                right += picked is not None and {album_of[p] for p in facets[picked].photo_ids} == {album}
                total += 1
    return right / total


def requests_for(people: list[str], prompts: list[str], seeds: int, strength: float, a,
                 steps: int | None = None) -> list[GenerationRequested]:
    return [GenerationRequested(
        event_id=f"{p}-{pi}-{s}-{strength}", user_id=p, event_time=datetime.now(UTC),
        request_id=f"{p}-{pi}-{s}-{strength}", prompt=prompt, seed=1000 + s, style_strength=strength,
        facet="overall", width=a.size, height=a.size, num_inference_steps=steps or a.steps, guidance_scale=a.guidance)
        for pi, prompt in enumerate(prompts) for s in range(seeds) for p in people]


def prompt_subject(prompt: str) -> str:
    return next(s for s in SUBJECTS if f" {s}" in f" {prompt}")


def content_and_leakage(classifier, images: list, reqs: list[GenerationRequested]) -> dict[str, float]:
    """Share of images showing their prompt's subject, overall and where the person photographs another."""
    shows = [got == prompt_subject(r.prompt) for got, r in zip(classifier.predict(images), reqs, strict=True)]
    other = [ok for ok, r in zip(shows, reqs, strict=True) if person_subject(r.user_id) != prompt_subject(r.prompt)]
    return {"content_accuracy": round(float(np.mean(shows)), 4),
            "leakage_prompt_wins": round(float(np.mean(other)), 4) if other else None}


def retrieval(handler, clip_model, space, targets: dict, people: list[str], images: list,
              reqs: list[GenerationRequested]) -> tuple[float, np.ndarray, np.ndarray]:
    """Share of images whose nearest person (by style) is their own; and the images' points and features."""
    emb, feats = image_styles(handler, clip_model, images)
    points = space(emb, feats)
    d = np.stack([np.linalg.norm(points - targets[p], axis=1) for p in people], 1)
    hits = [people[int(np.argmin(row))] == r.user_id for row, r in zip(d, reqs, strict=True)]
    return float(np.mean(hits)), points, feats


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
    ap.add_argument("--prompts", type=int, default=len(PROMPTS), help=f"prompts per person, at most {len(PROMPTS)}")
    ap.add_argument("--seeds", type=int, default=2, help="seeds per prompt (default: %(default)s)")
    ap.add_argument("--batch", type=int, default=6, help="images per diffusion call (default: %(default)s)")
    ap.add_argument("--size", type=int, default=64, help="image side in pixels (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=20, help="denoising steps (default: %(default)s; see above)")
    ap.add_argument("--guidance", type=float, default=4.0,
                    help="the prompt's classifier-free guidance scale, the style in both rows (default: %(default)s)")
    ap.add_argument("--reps", type=int, default=4, help="timed rounds for images/s (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=7, help="seed of the people's photo libraries")
    ap.add_argument("--classifier-images", type=int, default=4000, help="renders the content classifier learns from")
    ap.add_argument("--classifier-steps", type=int, default=600, help="its training steps (default: %(default)s)")
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
    spec = diffusion_spec(clip.pretrained, a.diffusion_model, a.ip_adapter, a.hyper_lora)
    if spec.hyper_lora is None:
        raise SystemExit("the benchmark compares the hyper-LoRA too: give --hyper-lora")
    handler = OpenClipImageHandler(clip, device=a.device)
    clip_model = handler.load_model()

    # 1. The people and their styles
    styles = people_styles(work, handler, clip_model, a.photos, a.seed)
    people, space, targets = style_targets(styles)

    # 2. The four variants: one pipeline with the hyper-LoRA, one without
    with_hyper = StyleGenerator(spec, clip, a.device)
    without = StyleGenerator(dataclasses.replace(spec, hyper_lora=None), clip, a.device)
    hyper_only = StyleGenerator(spec, clip, a.device, use_ip_adapter=False)
    none = StyleGenerator(dataclasses.replace(spec, hyper_lora=None), clip, a.device, use_ip_adapter=False)
    variants = {"none": none, "ip_adapter": without, "hyper_lora": hyper_only, "both": with_hyper}
    prompts = PROMPTS[:a.prompts]
    classifier = train_subject_classifier(a.classifier_images, a.classifier_steps)  # the judge of content
    facet_choice = facet_choice_accuracy(work, with_hyper, handler, clip_model, a.photos, a.seed)
    print(json.dumps({"classifier_held_out_accuracy": round(classifier.held_out_accuracy, 4),
                      "facet_choice_accuracy": round(facet_choice, 4)}), flush=True)

    results = {}
    for name, gen in variants.items():
        # 3. The strength sweep; its last point, strength 1, also gives retrieval and correlation
        sweep = []
        for strength in tqdm(STRENGTHS, desc=f"{name}: strengths", unit="strength"):
            reqs = requests_for(people, prompts, a.seeds, strength, a)
            images = generate(gen, reqs, styles, a.batch)
            hits, points, feats = retrieval(handler, clip_model, space, targets, people, images, reqs)
            owners = [r.user_id for r in reqs]
            sweep.append(float(np.mean([np.linalg.norm(x - targets[o]) for x, o in zip(points, owners, strict=True)])))
        # 4. Retrieval (is the nearest person the image's own?) and content (the prompt's subject?)
        content = content_and_leakage(classifier, images, reqs)
        # 5. Feature fidelity: requested vs generated named features
        corr = {}
        for n in NAMED:
            i = FEATURE_NAMES.index(n)
            want = np.array([styles[o].features[n] for o in owners], np.float64)
            got = feats[:, i].astype(np.float64)
            # Images that differ only by float rounding (no personalization) have no correlation to speak of.
            corr[n] = float(np.corrcoef(want, got)[0, 1]) if got.std() > 1e-6 and want.std() > 1e-6 else 0.0
        # 6. Serving's default of 4 steps, strength 1
        reqs_4 = requests_for(people, prompts, a.seeds, 1.0, a, steps=4)
        images_4 = generate(gen, reqs_4, styles, a.batch)
        # Facet choice is the CLIP's alone, the same for every variant; listed with each, as the others are.
        choice = {"facet_choice_accuracy": round(facet_choice, 4)}
        steps_4 = {"retrieval_accuracy": round(retrieval(handler, clip_model, space, targets, people, images_4,
                                                         reqs_4)[0], 4),
                   **content_and_leakage(classifier, images_4, reqs_4), **choice}
        results[name] = {"retrieval_accuracy": round(hits, 4), **content, **choice, "steps_4": steps_4,
                         "feature_correlation": round(float(np.mean(list(corr.values()))), 4),
                         "feature_correlations": {k: round(v, 4) for k, v in corr.items()},
                         "strength_sweep": [round(x, 4) for x in sweep],
                         "sweep_falls": all(later < earlier for earlier, later in itertools.pairwise(sweep))}
        print(json.dumps({"variant": name, **results[name]}), flush=True)

    # 7. Cost: strength 1 again, adapters already made (as a serving worker keeps them), the variants
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
        "chance": round(1 / len(people), 4), "content_chance": round(1 / len(SUBJECTS), 4),
        "classifier_held_out_accuracy": round(classifier.held_out_accuracy, 4),
        "facet_choice_accuracy": round(facet_choice, 4), "images_per_strength": len(reqs), "size": a.size,
        "steps": a.steps,
        "seconds": round(time.perf_counter() - t0, 1), "variants": results}))


if __name__ == "__main__":
    main()
