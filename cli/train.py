"""`stylestream train-adapter`: train the style adapter and the hyper-LoRA on a collection of images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stylestream.cli.options import DEFAULT_DATA_DIR, DataDir
from stylestream.cli.output import make_console
from stylestream.cli.words import counted
from stylestream.defaults import TINY_CLIP
from stylestream.pipelines.layout import DataLayout

console = make_console()


def train_adapter(
    images: Annotated[Path, typer.Argument(
        exists=True, metavar="IMAGES",
        help="A folder of images (its first-level folders are groups: a person, a look, an album) "
             "or a JSON-lines manifest of {\"path\", \"group\", \"caption\"}.")],
    output: Annotated[Path, typer.Option(
        "--output", "-o", file_okay=False, metavar="DIR",
        help="Folder for ip-adapter.safetensors, hyper-lora.safetensors, loss.png, training.json and the "
             "checkpoint; a run with the same folder resumes.")],
    diffusion_model: Annotated[str | None, typer.Option(
        metavar="DIR",
        help="A local diffusers StableDiffusionPipeline folder (default: the tiny trained model's).")] = None,
    clip_model: Annotated[str, typer.Option(
        metavar="NAME", help="open_clip architecture that computes the style vectors "
                             "(the one ingestion uses).")] = TINY_CLIP,
    clip_pretrained: Annotated[str | None, typer.Option(
        metavar="TAG|FILE", help="Its pretrained tag or checkpoint path.")] = None,
    steps: Annotated[int, typer.Option(
        min=1, metavar="N", help="Optimizer steps in all (a resumed run continues to this).")]
    = 2000,
    batch_size: Annotated[int, typer.Option(min=1, metavar="N", help="Images per step.")] = 32,
    learning_rate: Annotated[float, typer.Option(min=0.0, metavar="RATE", help="AdamW learning rate.")] = 1e-4,
    decay_steps: Annotated[int, typer.Option(
        min=0, metavar="N", help="The last N steps take the learning rate linearly to 0 (constant before, so a "
                                 "longer run can resume a shorter one's checkpoint from before its decay).")] = 0,
    resolution: Annotated[int, typer.Option(
        min=8, metavar="PIXELS", help="Training image side in pixels (512 for SD 1.5).")] = 64,
    train_base: Annotated[bool, typer.Option(
        "--train-base/--frozen-base", help="Also train the UNet (a small model from scratch); frozen by default.")]
    = False,
    hyper_rank: Annotated[int, typer.Option(
        min=1, metavar="N", help="Rank of the LoRA deltas the hyper-LoRA makes.")] = 4,
    prompts: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, metavar="FILE",
        help="Captions, one per line, drawn for images the manifest gives none "
             "(default: the empty prompt).")] = None,
    caption_dropout: Annotated[float, typer.Option(
        min=0.0, max=1.0, metavar="SHARE",
        help="Share of samples trained with the empty prompt instead of their caption, independently of the "
             "style, so the prompt gets a guidance scale of its own.")] = 0.0,
    own_style: Annotated[bool, typer.Option(
        "--own-style/--others-style",
        help="Condition each image on its own style as well as its group's; --others-style: only on other "
             "images of its group, so what an image shows cannot leak through the style.")] = True,
    seed: Annotated[int, typer.Option(metavar="N", help="Same seed, same data, same result.")] = 0,
    device: Annotated[str | None, typer.Option(
        metavar="DEVICE", help="cpu or cuda (default: cuda when present).")] = None,
    data_dir: DataDir = DEFAULT_DATA_DIR,
) -> None:
    """Train the style conditioning: the IP-Adapter-format style adapter (`serve --ip-adapter`) and the
    hyper-LoRA (`serve --hyper-lora`), with the diffusion loss, from images and their style vectors."""
    import torch

    from stylestream.cli.progress import stage_bars
    from stylestream.models.clip import clip_spec
    from stylestream.models.style_training import TrainConfig, train_style
    from stylestream.models.tiny_style import SHIPPED

    base = diffusion_model or str(SHIPPED / "pipeline")
    if not Path(base, "model_index.json").is_file():
        raise typer.BadParameter(f"{base} is not a diffusers pipeline folder (no model_index.json)",
                                 param_hint="--diffusion-model")
    captions = [line.strip() for line in prompts.read_text().splitlines()] if prompts else [""]
    if not captions:
        raise typer.BadParameter(f"{prompts} has no lines", param_hint="--prompts")
    try:
        clip = clip_spec(DataLayout(data_dir).models, clip_model, clip_pretrained)
        cfg = TrainConfig(
            images=images, diffusion_model=base, clip=clip, output=output, steps=steps, batch_size=batch_size,
            learning_rate=learning_rate, decay_steps=decay_steps, resolution=resolution, seed=seed,
            train_base=train_base, hyper_rank=hyper_rank, prompts=captions, caption_dropout=caption_dropout,
            own_style=own_style,
            device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
        console.print(f"training on {images} with {base} and {clip.describe()} ({cfg.device})")
        with stage_bars(console) as stage:
            bars = {}

            def on_progress(what: str, done: int, total: int) -> None:
                if what not in bars:
                    bars[what] = stage(what, total)
                bars[what](done)
            summary = train_style(cfg, on_progress, on_step=stage("training", steps))
    except ValueError as e:
        console.print(f"[red]cannot train:[/] {e}", soft_wrap=True)
        raise typer.Exit(1) from None
    if summary["skipped_images"]:
        console.print(f"[yellow]skipped {counted(len(summary['skipped_images']), 'unreadable image')}[/], "
                      f"e.g. {summary['skipped_images'][0]}", soft_wrap=True)
    console.print(f"{summary['steps']} steps on {summary['images']} images in {summary['seconds']:.0f} s "
                  f"({summary['seconds_per_step']:.3f} s/step), loss {summary['final_loss_mean_last_100']}")
    console.print(f"serve with: --ip-adapter {output / 'ip-adapter.safetensors'} "
                  f"--hyper-lora {output / 'hyper-lora.safetensors'}; loss curve: {output / 'loss.png'}",
                  soft_wrap=True)
