"""Training the style conditioning: the IP-Adapter-format style adapter and the hyper-LoRA, together.

Pairs are (image, style vector), the style vector computed by the project's own embedding and
feature code, either of the image itself or of a random subset of its group (a person, a look, an
album): serving conditions on a person's mean style, so training sees both. The loss is the usual
diffusion loss (noise or velocity prediction, as the base model's scheduler says) on the frozen
VAE's latents, precomputed once. The base model is frozen unless `train_base` (the tiny demo model
is trained from scratch this way, with zero terminal SNR and v-prediction: with SD's usual schedule
the noisiest latents still show the image's mean colour, so a model trained from scratch learns to
read the colour there instead of from the style, and samples from pure noise come out grey).

Each sample is trained through one of four paths (none, IP-Adapter only, hyper-LoRA only, both), so
either conditioning works alone and strength 0 stays the base model. Deterministic for a seed: every
step draws from a generator seeded by (seed, step), so a resumed run continues exactly as an
uninterrupted one would (on the same device: GPU kernels and bfloat16 are not bit-exact).

Outputs in the output folder: `ip-adapter.safetensors` (what `serve --ip-adapter` loads),
`hyper-lora.safetensors` (`serve --hyper-lora`), with `train_base` a `pipeline/` folder
(`serve --diffusion-model`), `loss.png`, `training.json`, and `checkpoint.pt` to resume from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from stylestream.models import low_rank
from stylestream.models.clip import ClipSpec
from stylestream.models.diffusion import (
    IP_ADAPTER_FILE,
    DiffusionSpec,
    adapter_input,
    ip_adapter_state_dict,
    load_pipeline,
)
from stylestream.models.hyper_lora import DEFAULT_TARGETS, HYPER_LORA_FILE, HyperLora, target_layers
from stylestream.models.random_models import random_ip_adapter
from stylestream.pipelines.library import PHOTO_SUFFIXES, manifest_rows, photo_files
from stylestream.schemas.tables import FEATURE_NAMES

CONDITIONS_PER_IMAGE = 4  # the image's own style and three means over random subsets of its group
MAX_SUBSET = 8  # photos in a group subset
# Share of samples trained through each path: (none, IP-Adapter only, hyper-LoRA only, both).
PATH_SHARES = (0.1, 0.15, 0.15, 0.6)
CHECKPOINT_FILE = "checkpoint.pt"
TRAINING_FILE = "training.json"


@dataclass
class TrainConfig:
    images: Path  # a folder (its first-level folders are groups) or a JSON-lines manifest
    diffusion_model: str  # a diffusers StableDiffusionPipeline folder
    clip: ClipSpec
    output: Path
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 1e-4
    resolution: int = 64
    seed: int = 0
    train_base: bool = False  # also train the UNet (a small model from scratch); frozen otherwise
    hyper_rank: int = 4
    hyper_hidden: int = 128
    hyper_targets: tuple[str, ...] = DEFAULT_TARGETS
    prompts: list[str] = field(default_factory=lambda: [""])  # captions drawn for images without one
    # Share of samples whose caption is replaced by the empty prompt, independently of the style
    # path drawn: the text then has its own guidance scale at generation.
    caption_dropout: float = 0.0
    # Condition on each image's own style as well as on its group's. False: only on styles of *other*
    # images of its group, so what an image shows cannot reach the model through the style path.
    own_style: bool = True
    # The last `decay_steps` steps take the learning rate linearly to 0; before them it is constant
    # (warm-up-stable-decay without the warm-up: AdamW's bias correction suffices here). The constant
    # part does not depend on `steps`, so a longer run resumes a shorter one's checkpoint from before
    # its decay and trains as if it had been asked for the longer run from the start.
    decay_steps: int = 0
    checkpoint_every: int = 250
    device: str = "cpu"


@dataclass
class TrainingSet:
    latents: torch.Tensor  # (n, c, h, w), scaled by the VAE's scaling factor
    conditions: torch.Tensor  # (n, CONDITIONS_PER_IMAGE, style dim): adapter inputs
    captions: list[str | None]  # per image; None draws from the configured prompts
    groups: list[str]
    skipped: list[str]  # images that could not be read, with the reason


# -- 1. The images and their style vectors ---------------------------------------------------------

def list_images(source: Path) -> list[tuple[Path, str, str | None]]:
    """(path, group, caption) of each training image. A folder: its first-level folders are groups,
    images directly in it are groups of one. A manifest: JSON lines with "path" (relative to the
    manifest), optional "group" and "caption"."""
    if source.is_dir():
        found = [(p, p.relative_to(source).parts[0] if len(p.relative_to(source).parts) > 1 else p.name, None)
                 for p in photo_files(source)]
    else:
        found = [(path, str(row.get("group", row["path"])), row.get("caption"))
                 for path, row in manifest_rows(source, '{"path": ..., "group"?, "caption"?}')]
    if not found:
        raise ValueError(f"no images ({', '.join(PHOTO_SUFFIXES)}) in {source}")
    return found


def square(image: Image.Image, size: int) -> Image.Image:
    """Centre crop to a square, resized to `size`."""
    return ImageOps.fit(image, (size, size), Image.Resampling.LANCZOS)


def to_pixels(image: Image.Image, size: int) -> torch.Tensor:
    """The (3, size, size) tensor in [-1, 1] that the VAE encodes: centre-cropped and resized."""
    return torch.from_numpy(np.asarray(square(image.convert("RGB"), size), np.float32) / 127.5 - 1).permute(2, 0, 1)


def group_conditions(embeddings: np.ndarray, features: np.ndarray, groups: list[str], dim: int,
                     seed: int, own_style: bool = True) -> np.ndarray:
    """(n, CONDITIONS_PER_IMAGE, dim): per image, its own style (with `own_style`), then the styles of
    random subsets of its group (computed by the same rule as a person's style, with equal weights);
    without `own_style`, every condition is a subset of the *other* images of its group."""
    from stylestream.transforms.style import style_of

    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    out = np.zeros((len(groups), CONDITIONS_PER_IMAGE, dim), np.float32)
    for i, g in enumerate(groups):
        if own_style:
            out[i, 0] = adapter_input(embeddings[i], features[i], dim)
        others = members[g] if own_style else [j for j in members[g] if j != i]
        if not others:
            raise ValueError(f"group {g!r} has one image: training on other images' styles needs two or more")
        for k in range(1 if own_style else 0, CONDITIONS_PER_IMAGE):
            pick = rng.choice(others, size=min(len(others), int(rng.integers(2, MAX_SUBSET + 1))), replace=False)
            out[i, k] = adapter_input(*style_of(embeddings[pick], features[pick], np.ones(len(pick))), dim)
    return out


def prepare_training_set(cfg: TrainConfig, pipe, dim: int,
                         on_progress: Callable[[str, int, int], None] | None = None) -> TrainingSet:
    """Decode every image, compute its style (ingestion's code) and its latents (the frozen VAE)."""
    from stylestream.transforms.embed import OpenClipImageHandler, image_styles
    from stylestream.transforms.images import DecodeLimits, PhotoError, decode

    listed = list_images(cfg.images)
    handler = OpenClipImageHandler(cfg.clip, device=cfg.device)
    clip_model = handler.load_model()
    vae = pipe.vae
    limits = DecodeLimits(min_side=max(DecodeLimits.min_side, cfg.resolution))  # never upscale to train
    kept, skipped, latents, embeddings, features = [], [], [], [], []
    chunk = 32
    for start in range(0, len(listed), chunk):
        images = []
        for item in listed[start:start + chunk]:
            try:
                images.append(decode(item[0].read_bytes(), limits)[0])
                kept.append(item)
            except (OSError, PhotoError) as e:
                skipped.append(f"{item[0]}: {e}")
        if on_progress:
            on_progress("styles and latents of the images", min(start + chunk, len(listed)), len(listed))
        if not images:
            continue
        emb, feats = image_styles(handler, clip_model, images)
        embeddings.append(emb)
        features.append(feats)
        pixels = torch.stack([to_pixels(im, cfg.resolution) for im in images]).to(cfg.device, vae.dtype)
        with torch.no_grad():
            latents.append(vae.encode(pixels).latent_dist.mean.float().cpu() * vae.config.scaling_factor)
    if not kept:
        raise ValueError(f"none of the {len(listed)} images in {cfg.images} could be read: {skipped[0]}")
    listed = kept
    groups = [g for _, g, _ in listed]
    conds = group_conditions(np.concatenate(embeddings), np.concatenate(features), groups, dim, cfg.seed,
                             cfg.own_style)
    return TrainingSet(torch.cat(latents), torch.from_numpy(conds), [c for _, _, c in listed], groups, skipped)


# -- 2. The models ---------------------------------------------------------------------------------

def is_style_adapter(name: str) -> bool:
    """Whether a UNet parameter belongs to the loaded style adapter (its projection or to_k_ip/to_v_ip)."""
    return name.startswith("encoder_hid_proj.") or ".processor." in name


@dataclass
class Trainee:
    pipe: object  # StylePipeline, style adapter loaded
    hyper: HyperLora
    params: list[torch.nn.Parameter]  # what the optimizer updates, in a fixed order

    # The style adapter trains on the inputs standardized as the hyper-LoRA's (the style's parts differ
    # in scale by orders of magnitude); `export` folds that into its projection, so serving feeds raw
    # vectors.
    def fit_input(self, conditions: torch.Tensor) -> None:
        """Standardize both conditioning paths by the training vectors' mean and spread."""
        self.hyper.fit_input(conditions.numpy())

    def standardized(self, conditions: torch.Tensor) -> torch.Tensor:
        return (conditions - self.hyper.input_mean) / self.hyper.input_scale


def build_trainee(cfg: TrainConfig, dim: int) -> Trainee:
    """The pipeline with a new style adapter (its to_k_ip/to_v_ip start as copies of the text
    attention, as IP-Adapter's training does), loaded through the same code serving uses, and a new
    hyper-LoRA for its target layers."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    init = cfg.output / "init" / IP_ADAPTER_FILE
    if not init.exists() or not (cfg.output / CHECKPOINT_FILE).exists():  # a fresh start: new initial weights
        unet = UNet2DConditionModel.from_pretrained(cfg.diffusion_model, subfolder="unet", local_files_only=True)
        init.parent.mkdir(parents=True, exist_ok=True)
        tokens = 4  # diffusers' loader reads four tokens from an IP-Adapter projection
        save_file(random_ip_adapter(unet, dim, tokens, cfg.seed, like_text_attention=True), str(init))
    pipe = load_pipeline(DiffusionSpec(cfg.diffusion_model, str(init)), cfg.device, dtype=torch.float32)
    unet = pipe.unet
    for module in (unet, pipe.vae, pipe.text_encoder):
        module.requires_grad_(False)
    hyper = HyperLora(dim, target_layers(unet, cfg.hyper_targets), cfg.hyper_rank, cfg.hyper_hidden, cfg.seed)
    hyper.to(cfg.device)
    adapter = [p for n, p in unet.named_parameters() if is_style_adapter(n)]
    base = [p for n, p in unet.named_parameters() if not is_style_adapter(n)]
    params = adapter + list(hyper.parameters()) + (base if cfg.train_base else [])
    for p in params:
        p.requires_grad_(True)
    return Trainee(pipe, hyper, params)


# -- 3. Training -----------------------------------------------------------------------------------

def step_generator(seed: int, step: int) -> torch.Generator:
    """Everything random in one step comes from this: a resumed run repeats an uninterrupted one."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def training_step(trainee: Trainee, data: TrainingSet, prompt_embeds: dict[str, torch.Tensor],
                  prompts: list[str], noise_scheduler, cfg: TrainConfig, step: int) -> torch.Tensor:
    """The diffusion loss of one batch, each sample through its drawn conditioning path."""
    g = step_generator(cfg.seed, step)
    unet, device = trainee.pipe.unet, cfg.device
    # 1. Draw images, which of their conditions to use, paths, captions, timesteps and noise
    idx = torch.randint(0, len(data.latents), (cfg.batch_size,), generator=g)
    which = torch.randint(0, CONDITIONS_PER_IMAGE, (cfg.batch_size,), generator=g)
    path = torch.multinomial(torch.tensor(PATH_SHARES), cfg.batch_size, replacement=True, generator=g)
    drawn = torch.randint(0, len(prompts), (cfg.batch_size,), generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (cfg.batch_size,), generator=g)
    latents = data.latents[idx]
    noise = torch.randn(latents.shape, generator=g)
    # Drawn last, so that without dropout a seed gives what it gave before the option existed.
    no_text = torch.rand(cfg.batch_size, generator=g) < cfg.caption_dropout if cfg.caption_dropout else \
        torch.zeros(cfg.batch_size, dtype=torch.bool)
    # 2. Noisy latents, text and style conditioning
    noisy = noise_scheduler.add_noise(latents, noise, t).to(device)
    captions = ["" if off else data.captions[i] if data.captions[i] is not None else prompts[d]
                for i, d, off in zip(idx, drawn, no_text, strict=True)]
    text = torch.stack([prompt_embeds[c] for c in captions]).to(device)
    cond = data.conditions[idx, which].to(device)
    ip_on = ((path == 1) | (path == 3)).float().to(device)
    hyper_on = ((path == 2) | (path == 3)).float().to(device)
    h, w = latents.shape[-2:]
    # 3. Predict the noise through the chosen paths
    with low_rank.added(unet, trainee.hyper.layer_deltas(cond, hyper_on)), _autocast(device):
        pred = unet(noisy, t.to(device), encoder_hidden_states=text,
                    added_cond_kwargs={"image_embeds": [trainee.standardized(cond)[:, None, :]]},
                    cross_attention_kwargs={"ip_adapter_masks": [ip_on.view(-1, 1, 1, 1).expand(-1, 1, h, w)]}
                    ).sample
    # 4. The loss against what the scheduler predicts: the noise, or the velocity (v-prediction)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    return torch.nn.functional.mse_loss(pred.float(), target.to(device))


def _autocast(device: str):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.startswith("cuda") else contextlib.nullcontext()


def train_style(cfg: TrainConfig, on_progress: Callable[[str, int, int], None] | None = None,
                on_step: Callable[[int, float], None] | None = None) -> dict:
    """Train (or resume) as configured; returns the summary also written to training.json."""
    from diffusers import DDPMScheduler

    cfg.output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    if not cfg.prompts:
        raise ValueError("no prompts to draw captions from (give at least the empty prompt)")
    checkpoint = cfg.output / CHECKPOINT_FILE
    state = torch.load(checkpoint, map_location="cpu", weights_only=False) if checkpoint.exists() else None
    if state is not None and state["fingerprint"] != _fingerprint(cfg):
        raise ValueError(f"{checkpoint} was made with other settings; use another --output or delete it")
    # 1. The style adapter's input size: the embedding model's embedding plus the features
    from stylestream.models.clip import embedding_dim

    dim = embedding_dim(cfg.clip) + len(FEATURE_NAMES)
    # 2. Models, then the training set through the frozen VAE and the embedding model
    trainee = build_trainee(cfg, dim)
    data = prepare_training_set(cfg, trainee.pipe, dim, on_progress)
    trainee.fit_input(data.conditions.reshape(-1, dim))
    pipe = trainee.pipe
    prompts = list(dict.fromkeys(cfg.prompts))
    wanted = sorted({*prompts, *(c for c in data.captions if c is not None), *([""] if cfg.caption_dropout else [])})
    with torch.no_grad():
        embeds = pipe.encode_prompt(wanted, cfg.device, 1, False)[0].float().cpu()
    prompt_embeds = dict(zip(wanted, embeds, strict=True))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(trainee.params, lr=cfg.learning_rate, weight_decay=1e-4)
    # 3. Resume from the checkpoint, if any
    start, losses, seconds = 0, [], 0.0
    if state is not None:
        with torch.no_grad():
            for p, saved in zip(trainee.params, state["params"], strict=True):
                p.copy_(saved)
        optimizer.load_state_dict(state["optimizer"])
        start, losses, seconds = state["step"], state["losses"], state["seconds"]
    # 4. The loop, checkpointing as it goes
    unet = pipe.unet
    unet.train()
    t0 = time.perf_counter() - seconds
    for step in range(start, cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * rate_factor(step, cfg.steps, cfg.decay_steps)
        loss = training_step(trainee, data, prompt_embeds, prompts, noise_scheduler, cfg, step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainee.params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            _save_checkpoint(checkpoint, cfg, trainee, optimizer, step + 1, losses, time.perf_counter() - t0)
    unet.eval()
    # 5. The products: adapter files, the trained base if any, the loss curve and a summary
    return export(cfg, trainee, losses, time.perf_counter() - t0, data)


def rate_factor(step: int, steps: int, decay_steps: int) -> float:
    """The learning rate at `step` as a share of the configured one: 1, then down to 0 over the last
    `decay_steps` of `steps` (the last step's rate is 1/decay_steps of it, not 0)."""
    return min(1.0, (steps - step) / decay_steps) if decay_steps > 0 else 1.0


def _fingerprint(cfg: TrainConfig) -> str:
    """Settings a resumed run must share with the run it continues (the step count may grow)."""
    d = asdict(cfg) | {"steps": None, "checkpoint_every": None, "device": None, "output": None}
    del d["decay_steps"]  # may change too; left out, not None, so that older checkpoints still resume
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def _save_checkpoint(path: Path, cfg: TrainConfig, trainee: Trainee, optimizer, step: int, losses: list[float],
                     seconds: float) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"fingerprint": _fingerprint(cfg), "step": step, "losses": losses, "seconds": seconds,
                "params": [p.detach().cpu() for p in trainee.params],
                "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(path)


# -- 4. What training leaves behind ----------------------------------------------------------------

def export(cfg: TrainConfig, trainee: Trainee, losses: list[float], seconds: float, data: TrainingSet) -> dict:
    from safetensors.torch import save_file

    adapter = ip_adapter_state_dict(trainee.pipe.unet)
    # fold the input standardization in: W (x - m) / s + b  ==  (W / s) x + (b - (W / s) m)
    weight = adapter["image_proj.proj.weight"] / trainee.hyper.input_scale.cpu()[None, :]
    adapter["image_proj.proj.weight"] = weight.contiguous()
    adapter["image_proj.proj.bias"] = adapter["image_proj.proj.bias"] - weight @ trainee.hyper.input_mean.cpu()
    save_file(adapter, str(cfg.output / IP_ADAPTER_FILE))
    trainee.hyper.save(cfg.output / HYPER_LORA_FILE)
    if cfg.train_base:
        save_base(trainee.pipe, cfg.diffusion_model, cfg.output / "pipeline")
    plot_losses(losses, cfg.output / "loss.png")
    summary = {"steps": len(losses), "images": len(data.latents), "groups": len(set(data.groups)),
               "skipped_images": data.skipped, "seconds": round(seconds, 1),
               "seconds_per_step": round(seconds / max(len(losses), 1), 4),
               "final_loss_mean_last_100": round(float(np.mean(losses[-100:])), 5) if losses else None,
               "clip_model": cfg.clip.model, "clip_weights_sha256": weights_sha256(cfg.clip.pretrained),
               "feature_names": list(FEATURE_NAMES),
               "config": json.loads(json.dumps(asdict(cfg), default=str))}
    (cfg.output / TRAINING_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def save_base(pipe, base_dir: str, out: Path) -> None:
    """The trained UNet without the style adapter, in a copy of the base pipeline folder."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(base_dir, subfolder="unet", local_files_only=True)
    trained = {k: v for k, v in pipe.unet.state_dict().items() if not is_style_adapter(k)}
    unet.load_state_dict(trained)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(base_dir, out, ignore=shutil.ignore_patterns("unet"))
    unet.save_pretrained(out / "unet")


def weights_sha256(path: str | None) -> str | None:
    """The sha256 of a weights file (None for a pretrained tag or random weights)."""
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def plot_losses(losses: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="0.8", linewidth=0.6, label="loss per step")
    if len(losses) >= 20:
        k = max(len(losses) // 50, 10)
        smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], smooth, color="tab:blue", label=f"mean of {k} steps")
    ax.set_xlabel("step")
    ax.set_ylabel("diffusion loss (MSE)")
    ax.set_yscale("log")
    ax.legend(loc="upper right")
    ax.set_title("style conditioning training")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
