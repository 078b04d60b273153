"""The tiny style model: a small diffusion model, style adapter and hyper-LoRA that really learned,
trained on a 2-core machine in minutes, so the demo and the benchmark can show personalization.

    python -m stylestream.models.tiny_style            # writes models/trained/tiny-style/

Steps (each printed with a progress bar):
1. Render the synthetic looks (demo/synthetic.py: warm, cool, mono, pastel, moody, green) as 64-px
   PNGs, one folder per look.
2. Train a small VAE on them (64 px -> 16x16x4 latents) and build the base pipeline around it
   (random text encoder, UNet from configs/diffusion/tiny-style.json, seed 0).
3. Train the UNet from scratch together with the style adapter and the hyper-LoRA
   (models/style_training.py, the same code `stylestream train-adapter` runs at any size).
4. Copy what serving loads into the output folder, with the loss curve and a summary.

The result is shipped in the package (a few MB) with this script, so nothing trains at run time.
It depends on the exact weights of the tiny CLIP (random weights from a fixed seed): the summary
records their sha256 and loading refuses a mismatch, pointing back here.
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

from stylestream.models.clip import ensure_tiny_clip
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
STEPS, VAE_STEPS, PER_LOOK, BATCH_SIZE = 4000, 600, 160, 32
# Captions drawn at random for every training image: the tiny text encoder is random and knows no
# words, so these only teach the UNet to keep the style whatever the prompt (the demo's and the
# benchmark's prompts are among them).
PROMPTS = [
    "a birthday card with a cake", "a photo of a street", "a bowl of fruit", "a mountain lake at dawn",
    "a portrait of a cat", "flowers on a table", "a city at night", "a beach with umbrellas",
    "a cup of coffee", "a forest path", "an old car", "a poster for a concert", "", "a photo",
    "a drawing of a house", "a plate of pasta",
]


# -- 1. Data ---------------------------------------------------------------------------------------

def render_looks(root: Path, per_look: int, seed: int = 0) -> int:
    """`per_look` photos of every synthetic look under root/<look>/, as the demo's library has them
    (320x240 JPEGs), so their style vectors are those of real uploads; training crops and reduces
    them to 64 px for the diffusion model."""
    from stylestream.demo.synthetic import LOOKS, render

    n = 0
    for li, name in enumerate(sorted(LOOKS)):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_look):
            render(LOOKS[name], seed * 1_000_003 + 50_000 + li * 10_007 + i).save(root / name / f"{i:04d}.jpg",
                                                                                   quality=90)
            n += 1
    return n


# -- 2. The VAE ------------------------------------------------------------------------------------

def train_vae(vae, images: torch.Tensor, steps: int, batch_size: int, seed: int,
              on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Reconstruction training (MSE, a light KL term) of a small AutoencoderKL on (n, 3, h, w) images
    in [-1, 1]; then sets its scaling factor so that latents have unit variance, as SD's does."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
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


# -- 3 and 4. Everything, in order -----------------------------------------------------------------

def build(out: Path, work: Path, steps: int, vae_steps: int, per_look: int, batch_size: int,
          progress) -> dict:
    """Make the tiny style model in `out`; `progress(description, total)` returns `update(done, loss)`."""
    t0 = time.perf_counter()
    clip = ensure_tiny_clip(work / "models")
    # 1. Data
    images_dir = work / "images"
    n = render_looks(images_dir, per_look)
    # 2. The VAE, then the base pipeline around it
    pipe = random_pipeline(CONFIG, work / "tokenizer-src")
    update = progress("training the VAE", vae_steps)
    vae_losses = train_vae(pipe.vae, load_images(images_dir), vae_steps, 16, seed=0, on_step=update)
    base = work / "base"
    pipe.save_pretrained(base)
    vae_seconds = time.perf_counter() - t0
    # 3. UNet, style adapter and hyper-LoRA
    cfg = TrainConfig(images=images_dir, diffusion_model=str(base), clip=clip, output=work / "train", steps=steps,
                      batch_size=batch_size, learning_rate=1e-3, resolution=RESOLUTION, train_base=True,
                      prompts=PROMPTS)
    prep = progress("styles and latents of the training images", n)
    update = progress("training UNet, style adapter and hyper-LoRA", steps)
    summary = train_style(cfg, on_progress=lambda _what, done, _total: prep(done), on_step=update)
    # 4. What serving loads
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(cfg.output / "pipeline", out / "pipeline")
    for name in (IP_ADAPTER_FILE, HYPER_LORA_FILE, "loss.png"):
        shutil.copy2(cfg.output / name, out / name)
    summary |= {"vae_steps": vae_steps, "vae_final_loss": round(float(np.mean(vae_losses[-50:])), 5),
                "vae_seconds": round(vae_seconds, 1), "images_per_look": per_look,
                "this_run_seconds": round(time.perf_counter() - t0, 1), "torch_threads": torch.get_num_threads()}
    summary["config"]["images"] = "synthetic looks (demo/synthetic.py), rendered by models/tiny_style.py"
    summary["config"]["diffusion_model"] = "configs/diffusion/tiny-style.json, VAE trained first"
    summary["config"]["output"] = str(SHIPPED.relative_to(SHIPPED.parent.parent))
    summary["config"]["clip"] = {"model": clip.model, "pretrained": "random weights, seed 0 (models/clip.py)"}
    (out / TRAINING_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def ensure_tiny_style(models_dir: Path, clip_weights: str | None) -> DiffusionSpec:
    """The shipped tiny style model (built into models_dir if the package lacks it), checked against
    the tiny CLIP weights at hand."""
    root = SHIPPED if (SHIPPED / TRAINING_FILE).exists() else models_dir / "diffusion" / CONFIG
    if not (root / TRAINING_FILE).exists():
        from stylestream.cli.progress import stage_bars

        with tempfile.TemporaryDirectory() as work, stage_bars() as stage:
            build(root, Path(work), STEPS, VAE_STEPS, PER_LOOK, BATCH_SIZE, stage)
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
    ap.add_argument("--out", type=Path, default=SHIPPED, help="where to write the model (default: %(default)s)")
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
        summary = build(a.out, work, a.steps, a.vae_steps, a.per_look, a.batch_size, stage)
    print(json.dumps({k: v for k, v in summary.items() if k != "config"}))


if __name__ == "__main__":
    main()
