"""The tiny models that really learned: a CLIP that knows the words for what the synthetic photos
show and how they look, and a small diffusion model, style adapter and hyper-LoRA where the prompt
says what and the person's style says how; trained on a 2-core machine in well under an hour, so
the demo and the benchmarks can show personalization.

    python -m stylestream.models.tiny_style   # writes models/trained/tiny-clip/ and tiny-style/

Steps (each printed with a progress bar):
1. Render captioned synthetic photos (demo/synthetic.py): the six looks, each showing random scenes
   (one to three of eight subjects, left, centre or right), with captions that say both.
2. Train the tiny CLIP (configs/clip/, open_clip's model, tokenizer and contrastive loss) on them.
3. Train a small VAE on the looks' photos (64 px -> 16x16x4 latents) and build the base pipeline
   around it: the text encoder is the trained CLIP's text tower, frozen (as Stable Diffusion's is
   CLIP's); the UNet comes from configs/diffusion/tiny-style.json, seed 0.
4. Train the UNet from scratch together with the style adapter and the hyper-LoRA
   (models/style_training.py, the same code `stylestream train-adapter` runs at any size), on the
   photos' captions, with each photo's style drawn from *other* photos of its look (what a photo
   shows never reaches the model through the style path), and the caption and the style dropped
   independently, so that the prompt can be guided with the style held (its strength its own scale).
5. Copy what serving loads into the output folders, with the loss curves and a summary.

The result is shipped in the package with this script, so nothing trains at run time. The style
model depends on the exact weights of the tiny CLIP: the summary records their sha256 and loading
refuses a mismatch, pointing back here.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stylestream.defaults import TINY_CLIP
from stylestream.demo.synthetic import Scene, every_scene
from stylestream.models import clip_training
from stylestream.models.clip import TRAINED_TINY_CLIP, ClipSpec, load_clip, save_clip, text_encoder_from_clip
from stylestream.models.clip_training import Captions
from stylestream.models.diffusion import IP_ADAPTER_FILE, DiffusionSpec
from stylestream.models.hyper_lora import HYPER_LORA_FILE
from stylestream.models.random_models import random_pipeline
from stylestream.models.style_training import (
    TRAINING_FILE,
    TrainConfig,
    step_generator,
    to_pixels,
    train_style,
    weights_sha256,
)
from stylestream.schemas.tables import FEATURE_NAMES

SHIPPED = Path(__file__).parent / "trained" / "tiny-style"
CONFIG = "tiny-style"
RESOLUTION = 64
STEPS, VAE_STEPS, PER_LOOK, BATCH_SIZE = 8000, 2400, 1500, 32
DECAY_SHARE = 0.25  # of the UNet's steps, the last ones, its learning rate going to 0
CLIP_IMAGES, CLIP_STEPS, CLIP_BATCH_SIZE, CLIP_HELD_APART = 12000, 4000, 128, 600
CAPTION_DROPOUT = 0.1
MANIFEST = "images.jsonl"


# -- 1. Data ---------------------------------------------------------------------------------------

def clip_views(photos: list[tuple[str, Scene]], every: bool = False) -> list[Captions]:
    """What the tiny CLIP learns to match with (look, scene) photos, at two levels of detail: "a warm
    photo of two stars on the left" and "two stars on the left" (how a prompt names it). Each view's
    texts are those of `photos`, or with `every` all that a synthetic photo can have."""
    from stylestream.demo.synthetic import LOOKS

    levels = [
        (lambda look, scene: f"a {look} photo of {scene.caption}",
         [(look, scene) for look in sorted(LOOKS) for scene in every_scene()]),
        (lambda _, scene: scene.caption, [("", scene) for scene in every_scene()]),
    ]
    views = []
    for text, possible in levels:
        texts = sorted({text(*p) for p in (possible if every else photos)})
        index = {t: i for i, t in enumerate(texts)}
        views.append(Captions(texts, torch.tensor([index[text(*p)] for p in photos])))
    return views


def clip_photos(n: int, seed: int, preprocess) -> tuple[torch.Tensor, list[tuple[str, Scene]]]:
    """`n` photos of random looks and scenes, as the CLIP's preprocess sees them, with their (look, scene)."""
    from stylestream.demo.synthetic import LOOKS, random_scene, render

    looks = sorted(LOOKS)
    rng = np.random.default_rng(seed)
    pixels, photos = [], []
    for i in range(n):
        look, photo_seed = looks[int(rng.integers(len(looks)))], seed * 1_000_003 + i
        scene = random_scene(photo_seed)
        pixels.append(preprocess(render(LOOKS[look], photo_seed, scene=scene)))
        photos.append((look, scene))
    return torch.stack(pixels), photos


def render_looks(root: Path, per_look: int, seed: int = 0) -> Path:
    """`per_look` photos of every synthetic look under root/<look>/, as the demo's library has them
    (320x240 JPEGs), so their style vectors are those of real uploads (training crops and reduces them
    to 64 px); returns the manifest that names each one's look (its group) and caption."""
    from stylestream.demo.synthetic import LOOKS, random_scene, render

    rows = []
    for li, name in enumerate(sorted(LOOKS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_look):
            photo_seed = seed * 1_000_003 + 50_000 + li * 10_007 + i
            scene = random_scene(photo_seed)
            render(LOOKS[name], photo_seed, scene=scene).save(root / name / f"{i:04d}.jpg", quality=90)
            rows.append({"path": f"{name}/{i:04d}.jpg", "group": name, "caption": scene.caption} | scene.labels)
    manifest = root / MANIFEST
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


# -- 2. The CLIP -----------------------------------------------------------------------------------

def train_tiny_clip(out: Path, images: int, steps: int, batch_size: int, progress) -> dict:
    """The tiny CLIP trained from its seeded random weights, written to `out`; returns its figures on
    photos it never saw: the share whose own text ranks first among every possible one, per view."""
    model, preprocess, tokenizer = load_clip(ClipSpec(TINY_CLIP, None))
    update = progress("rendering the CLIP's captioned photos", 2)
    pixels, photos = clip_photos(images, 1, preprocess)
    update(1, None)
    held_pixels, held_photos = clip_photos(CLIP_HELD_APART, 2, preprocess)
    update(2, None)
    update = progress("training the tiny CLIP", steps)
    t0 = time.perf_counter()
    losses = clip_training.train_clip(model, pixels, clip_views(photos), tokenizer, steps, batch_size,
                                      on_step=update)
    seconds = time.perf_counter() - t0
    save_clip(model, out)
    return {"images": images, "steps": steps, "batch_size": batch_size, "seconds": round(seconds, 1),
            "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 4),
            "held_apart_images": CLIP_HELD_APART} | clip_figures(model, tokenizer, held_pixels, held_photos)


def clip_figures(model, tokenizer, pixels: torch.Tensor, photos: list[tuple[str, Scene]]) -> dict[str, float]:
    """Shares of `photos` whose own text ranks first among all a synthetic photo can have: the whole
    caption (chance 1/432), the scene (1/72); and whose best scene names their subject (1/8)."""
    seen = clip_training.encode_images(model, pixels)
    whole, scene = clip_views(photos, every=True)
    best_scene = (seen @ clip_training.encode_texts(model, tokenizer, scene.texts).T).argmax(dim=1)
    subject_of = {s.caption: s.subject for s in every_scene()}
    return {"caption_top1": round(clip_training.top1_accuracy(
                seen, clip_training.encode_texts(model, tokenizer, whole.texts), whole.ids), 3),
            "scene_top1": round(float((best_scene == scene.ids).float().mean()), 3),
            "subject_top1": round(float(np.mean([subject_of[scene.texts[int(b)]] == s.subject
                                                 for b, (_, s) in zip(best_scene, photos, strict=True)])), 3)}


# -- 3. The VAE ------------------------------------------------------------------------------------

def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, seed: int,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Reconstruction training (MSE, a light KL term; warm-up and cosine decay) of a small AutoencoderKL
    on (n, 3, h, w) images in [-1, 1]; then sets its scaling factor so that latents have unit variance,
    as SD's does."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    schedule = clip_training.warmup_cosine(optimizer, steps)
    losses = []
    vae.train()
    for step in range(steps):
        g = step_generator(seed, step)
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)]
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=g)
        recon = vae.decode(z).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * dist.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    vae.eval()
    with torch.no_grad():
        std = torch.cat([vae.encode(images[i:i + 64]).latent_dist.mean for i in range(0, len(images), 64)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return losses


def load_images(root: Path) -> torch.Tensor:
    """Every training image, cropped and reduced as training does, in [-1, 1]."""
    paths = sorted(root.rglob("*.jpg"))
    return torch.stack([to_pixels(Image.open(p), RESOLUTION) for p in paths])


# -- 4 and 5. Everything, in order ------------------------------------------------------------------

def build(out: Path, clip_out: Path, work: Path, steps: int, vae_steps: int, per_look: int, batch_size: int,
          clip_steps: int, clip_images: int, progress) -> dict:
    """Make the tiny CLIP in `clip_out` and the tiny style model in `out`; `progress(description,
    total)` returns `update(done, loss)`."""
    t0 = time.perf_counter()
    # 1 and 2. The captioned photos, and the tiny CLIP trained on them (both models are written to
    # their destinations together at the end: an interrupted build leaves the shipped pair as it was)
    trained_clip = work / "clip" / f"{TINY_CLIP}.safetensors"
    clip_summary = train_tiny_clip(trained_clip, clip_images, clip_steps, CLIP_BATCH_SIZE, progress)
    clip = ClipSpec(TINY_CLIP, str(trained_clip))
    manifest = render_looks(work / "images", per_look)
    # 3. The VAE, then the base pipeline around it and the CLIP's text tower
    t_vae = time.perf_counter()
    pipe = random_pipeline(CONFIG, work / "tokenizer-src", text_encoder_from_clip(load_clip(clip)[0]))
    update = progress("training the VAE", vae_steps)
    vae_losses = train_vae(pipe.vae, load_images(manifest.parent), vae_steps, 16, seed=0, on_step=update)
    base = work / "base"
    pipe.save_pretrained(base)
    vae_seconds = time.perf_counter() - t_vae
    # 4. UNet, style adapter and hyper-LoRA, on the captions, each photo styled by others of its look
    cfg = TrainConfig(images=manifest, diffusion_model=str(base), clip=clip, output=work / "train", steps=steps,
                      batch_size=batch_size, learning_rate=1e-3, decay_steps=int(steps * DECAY_SHARE),
                      resolution=RESOLUTION, train_base=True,
                      caption_dropout=CAPTION_DROPOUT, own_style=False)
    prep = progress("styles and latents of the training images", len(manifest.read_text().splitlines()))
    update = progress("training UNet, style adapter and hyper-LoRA", steps)
    summary = train_style(cfg, on_progress=lambda _what, done, _total: prep(done), on_step=update)
    # 5. What serving loads
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(cfg.output / "pipeline", out / "pipeline")
    for name in (IP_ADAPTER_FILE, HYPER_LORA_FILE, "loss.png"):
        shutil.copy2(cfg.output / name, out / name)
    clip_out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(trained_clip, clip_out)
    summary |= {"clip": clip_summary, "vae_steps": vae_steps,
                "vae_final_loss": round(float(np.mean(vae_losses[-50:])), 5), "vae_seconds": round(vae_seconds, 1),
                "images_per_look": per_look, "this_run_seconds": round(time.perf_counter() - t0, 1),
                "torch_threads": torch.get_num_threads()}
    summary["config"]["images"] = "captioned synthetic looks (demo/synthetic.py), rendered by models/tiny_style.py"
    summary["config"]["diffusion_model"] = ("configs/diffusion/tiny-style.json, VAE trained first, "
                                            "text encoder the tiny CLIP's text tower")
    models = SHIPPED.parent.parent  # paths as the package names them, not as this machine does
    summary["config"]["output"] = str(out.relative_to(models) if out.is_relative_to(models) else out)
    summary["config"]["clip"] = {"model": clip.model, "trained_by": "step 2",
                                 "pretrained": str(clip_out.relative_to(models) if clip_out.is_relative_to(models)
                                                   else clip_out)}
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def ensure_tiny_style(clip_weights: str | None) -> DiffusionSpec:
    """The shipped tiny style model, checked against the tiny CLIP weights at hand."""
    root = SHIPPED
    if not (root / TRAINING_FILE).exists():
        raise FileNotFoundError(f"the tiny style model is missing from {root}: build it (and the tiny CLIP) with "
                                "`python -m stylestream.models.tiny_style`")
    training = json.loads((root / TRAINING_FILE).read_text())
    if training.get("feature_names") != list(FEATURE_NAMES):
        raise ValueError(
            f"the tiny style model ({root}) was trained on other aesthetic features than this code computes: "
            "rebuild it with `python -m stylestream.models.tiny_style`")
    trained_with = training["clip_weights_sha256"]
    have = weights_sha256(clip_weights)
    if have != trained_with:
        raise ValueError(
            f"the tiny style model ({root}) works with the tiny CLIP it was trained with (weights "
            f"{trained_with[:12]}…), not with {f'weights {have[:12]}…' if have else 'another model'}: give "
            "--diffusion-model and --ip-adapter trained for your embedding model (stylestream train-adapter), "
            "or rebuild the tiny one with `python -m stylestream.models.tiny_style`")
    return DiffusionSpec(str(root / "pipeline"), str(root / IP_ADAPTER_FILE), str(root / HYPER_LORA_FILE))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=SHIPPED, help="where to write the style model (default: %(default)s)")
    ap.add_argument("--clip-out", type=Path, default=TRAINED_TINY_CLIP,
                    help="where to write the tiny CLIP's checkpoint (default: %(default)s)")
    ap.add_argument("--clip-steps", type=int, default=CLIP_STEPS, help="CLIP training steps (default: %(default)s)")
    ap.add_argument("--clip-images", type=int, default=CLIP_IMAGES,
                    help="captioned photos the CLIP trains on (default: %(default)s)")
    ap.add_argument("--steps", type=int, default=STEPS, help="UNet + adapter training steps (default: %(default)s)")
    ap.add_argument("--vae-steps", type=int, default=VAE_STEPS, help="VAE training steps (default: %(default)s)")
    ap.add_argument("--per-look", type=int, default=PER_LOOK, help="training images per look (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="(default: %(default)s)")
    ap.add_argument("--work", type=Path, default=None, help="keep intermediate files here (default: a temp folder)")
    a = ap.parse_args(argv)
    for var, value in (("HF_HUB_OFFLINE", "1"), ("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                       ("HF_HUB_DISABLE_PROGRESS_BARS", "1")):
        os.environ.setdefault(var, value)
    work = a.work or Path(tempfile.mkdtemp(prefix="tiny-style-"))
    from stylestream.cli.progress import stage_bars

    with stage_bars() as stage:
        summary = build(a.out, a.clip_out, work, a.steps, a.vae_steps, a.per_look, a.batch_size, a.clip_steps,
                        a.clip_images, stage)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
    main()
