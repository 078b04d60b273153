"""New models with random weights from the configs in configs/diffusion/: the tiny pipelines tests
and benchmarks load (through the same loading code as pretrained weights, models/diffusion.py), the
SD-1.5-sized one for GPU benchmarks, the starting point of training, and random LoRA weights that
stand in for a user's fine-tuned style offline."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from stylestream.models.diffusion import CONFIG_DIR, IP_ADAPTER_FILE, DiffusionSpec, cross_attention_layers


def clip_tokenizer_files(directory: Path) -> None:
    """vocab.json + merges.txt for transformers' CLIPTokenizer, from open_clip's bundled BPE file.

    Gives the same token ids as the CLIP tokenizer without downloading anything.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def random_ip_adapter(unet, input_dim: int, tokens: int, seed: int = 0,
                      like_text_attention: bool = False) -> dict[str, torch.Tensor]:
    """New IP-Adapter weights in the original layout: an image projection from `input_dim` to `tokens`
    context tokens, and to_k_ip/to_v_ip for every cross-attention layer, random or (to start training,
    as IP-Adapter does) copies of the layer's text to_k/to_v."""
    g = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    sd = {
        "image_proj.proj.weight": torch.randn(cross * tokens, input_dim, generator=g) / input_dim**0.5,
        "image_proj.proj.bias": torch.zeros(cross * tokens),
        "image_proj.norm.weight": torch.ones(cross),
        "image_proj.norm.bias": torch.zeros(cross),
    }
    for key, name in cross_attention_layers(unet):
        attn = unet.get_submodule(name)
        for ip, text in (("to_k_ip", attn.to_k), ("to_v_ip", attn.to_v)):
            sd[f"ip_adapter.{key}.{ip}.weight"] = (
                text.weight.detach().clone() if like_text_attention
                else torch.randn(text.out_features, cross, generator=g) / cross**0.5)
    return sd


def ensure_tiny_diffusion(models_dir: Path, style_dim: int, config: str = "tiny") -> DiffusionSpec:
    """A random-weight pipeline built from configs/diffusion/<config>.json ("tiny" for tests and the
    demo, "sd15" for an SD-1.5-sized one on a GPU) and a style adapter for `style_dim`-sized vectors,
    written once."""
    root = models_dir / "diffusion" / config
    spec = DiffusionSpec(str(root / "pipeline"), str(root / f"style-{style_dim}" / IP_ADAPTER_FILE))
    if Path(spec.model_dir, "model_index.json").exists() and Path(spec.ip_adapter).exists():
        return spec

    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    if not Path(spec.model_dir, "model_index.json").exists():
        random_pipeline(config, root / "tokenizer-src").save_pretrained(spec.model_dir)
    unet = UNet2DConditionModel.from_pretrained(spec.model_dir, subfolder="unet")
    Path(spec.ip_adapter).parent.mkdir(parents=True, exist_ok=True)
    tokens = json.loads((CONFIG_DIR / f"{config}.json").read_text())["ip_adapter_tokens"]
    save_file(random_ip_adapter(unet, style_dim, tokens), spec.ip_adapter)
    return spec


def random_pipeline(config: str, tokenizer_dir: Path, text_encoder=None) -> StableDiffusionPipeline:
    """A StableDiffusionPipeline with random weights (seed 0) from configs/diffusion/<config>.json,
    around `text_encoder` if given (a CLIP's text tower, `clip.text_encoder_from_clip`), else a random
    one from the config."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    cfg = json.loads((CONFIG_DIR / f"{config}.json").read_text())
    if text_encoder is None and "text_encoder" not in cfg:
        raise ValueError(f"configs/diffusion/{config}.json has no text encoder of its own: give a CLIP's text tower")
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**cfg["unet"])
    clip_tokenizer_files(tokenizer_dir)
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**cfg["vae"]),
        text_encoder=text_encoder if text_encoder is not None else CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
        tokenizer=CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"),
                                model_max_length=77),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**cfg["scheduler"]),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def random_lora(unet, rank: int = 4, seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Random (non-zero) LoRA weights for the UNet's attention projections, in the diffusers/peft
    key format (`unet.<module>.lora_A.weight`): stands in for a user's fine-tuned style offline."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".processor." not in name:
            sd[f"unet.{name}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=g) / rank
            sd[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=g) * scale
    return sd
