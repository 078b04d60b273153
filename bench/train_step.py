#!/usr/bin/env python
"""Training step time of `stylestream train-adapter` (style adapter + hyper-LoRA, frozen base),
against the frozen UNet's plain forward pass on the same batch in the same run (`ratio`).

Random weights at real sizes: `--config sd15` builds an SD-1.5-sized pipeline (meant for a GPU; on
CPU use `--batch 1 --steps 3`), `--config tiny` the test-sized one. Synthetic images at
`--resolution`. The figure that matters is seconds_per_step at the batch and resolution you will
train with: steps x seconds_per_step is the training time. Final line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from diffusers import DDPMScheduler

from stylestream.demo.synthetic import LOOKS, render
from stylestream.models.clip import embedding_dim, ensure_tiny_clip
from stylestream.models.random_models import ensure_tiny_diffusion
from stylestream.models.style_training import (
    TrainConfig,
    build_trainee,
    is_style_adapter,
    prepare_training_set,
    training_step,
)
from stylestream.schemas.tables import FEATURE_NAMES


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="tiny", choices=["tiny", "sd15"])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--resolution", type=int, default=None, help="default: 512 for sd15, 64 for tiny")
    ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()
    resolution = a.resolution or (512 if a.config == "sd15" else 64)
    work = Path(tempfile.mkdtemp(prefix="train-step-"))
    clip = ensure_tiny_clip(work / "models")
    dim = embedding_dim(clip) + len(FEATURE_NAMES)
    spec = ensure_tiny_diffusion(work / "models", dim, a.config)
    images = work / "images"
    for look in sorted(LOOKS)[:2]:
        (images / look).mkdir(parents=True)
        for i in range(max(a.batch, 2)):
            render(LOOKS[look], i, (resolution, resolution)).save(images / look / f"{i}.png")
    cfg = TrainConfig(images=images, diffusion_model=spec.model_dir, clip=clip, output=work / "out",
                      steps=a.steps + 1, batch_size=a.batch, resolution=resolution, device=a.device)
    trainee = build_trainee(cfg, dim)
    data = prepare_training_set(cfg, trainee.pipe, dim)
    trainee.fit_input(data.conditions.reshape(-1, dim))
    with torch.no_grad():
        text = trainee.pipe.encode_prompt([""], a.device, 1, False)[0].float().cpu()
    noise_scheduler = DDPMScheduler.from_config(trainee.pipe.scheduler.config)
    optimizer = torch.optim.AdamW(trainee.params, lr=1e-4)
    unet = trainee.pipe.unet

    def sync() -> None:
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()

    def step(i: int) -> None:
        loss = training_step(trainee, data, {"": text[0]}, [""], noise_scheduler, cfg, i)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def forward(_i: int) -> None:  # the baseline: the UNet's forward pass alone (style masked off), no gradients
        lat = data.latents[: a.batch].to(a.device)
        with torch.no_grad():
            unet(lat, torch.full((a.batch,), 500, device=a.device), text.expand(a.batch, -1, -1).to(a.device),
                 added_cond_kwargs={"image_embeds": [data.conditions[: a.batch, :1].to(a.device)]},
                 cross_attention_kwargs={"ip_adapter_masks": [torch.zeros(a.batch, 1, *lat.shape[-2:],
                                                                          device=a.device)]})

    timings = {}
    for name, fn in (("forward", forward), ("train", step)):
        fn(0)  # warm-up
        sync()
        t = time.perf_counter()
        for i in range(1, a.steps + 1):
            fn(i)
        sync()
        timings[name] = (time.perf_counter() - t) / a.steps
    trainable = sum(p.numel() for p in trainee.params)
    print(json.dumps({
        "bench": "train_step", "config": a.config, "device": a.device, "batch": a.batch, "resolution": resolution,
        "trainable_params_m": round(trainable / 1e6, 2),
        "unet_params_m": round(sum(p.numel() for n, p in unet.named_parameters() if not is_style_adapter(n)) / 1e6, 1),
        "seconds_per_step": round(timings["train"], 4), "forward_seconds": round(timings["forward"], 4),
        "ratio": round(timings["train"] / timings["forward"], 2),
        "images_per_s": round(a.batch / timings["train"], 2),
        "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if a.device.startswith("cuda") else None,
    }))


if __name__ == "__main__":
    main()
