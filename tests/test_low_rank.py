"""Per-sample LoRA as batched matrix products (models/low_rank.py, serving/lora.py) against peft's
own mixed-batch path, on one SD-1.5-size layer and through the tiny UNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from stylestream.models import low_rank
from stylestream.models.diffusion import adapter_input_dim, load_pipeline
from stylestream.models.hyper_lora import HyperLora, target_layers
from stylestream.models.low_rank import LowRank
from stylestream.models.random_models import random_lora
from stylestream.serving.lora import LoraSource, UserLoras, from_state_dict

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


def peft_rows(model: nn.Module, adapters: dict[str, dict[str, LowRank]], names: list[str]):
    """`model` with every adapter injected through peft, and a forward that applies names[i] to row i
    (peft's mixed-batch path, a loop over the batch's adapters in every layer)."""
    for name, adapter in adapters.items():
        layers = sorted(adapter)
        rank = next(iter(adapter.values())).down.shape[0]
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=layers), model, adapter_name=name)
        for layer, d in adapter.items():
            module = model.get_submodule(layer)
            module.lora_A[name].weight.data.copy_(d.down)
            module.lora_B[name].weight.data.copy_(d.up)
    from peft.tuners.lora import LoraLayer

    def hook(_module, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs
    for m in model.modules():
        if isinstance(m, LoraLayer):
            m.register_forward_pre_hook(hook, with_kwargs=True)
    return model


def random_adapter(layer: str, fan_in: int, fan_out: int, rank: int, seed: int) -> dict[str, LowRank]:
    g = torch.Generator().manual_seed(seed)
    return {layer: LowRank(torch.randn(rank, fan_in, generator=g) / rank, torch.randn(fan_out, rank, generator=g))}


def test_stacked_shares_a_common_down_matrix_and_pads_differing_ranks():
    shared = torch.randn(4, 6)
    rows = [LowRank(shared, torch.randn(5, 4)), None, LowRank(shared[:], torch.randn(5, 4))]
    down, up = low_rank.stacked(rows)
    assert down.shape == (4, 6) and up.shape == (3, 5, 4) and not up[1].any()
    mixed = [LowRank(torch.randn(2, 6), torch.randn(5, 2)), LowRank(shared, torch.randn(5, 4)), None]
    down, up = low_rank.stacked(mixed)
    assert down.shape == (3, 4, 6) and up.shape == (3, 5, 4)
    assert not down[0, 2:].any() and not up[0, :, 2:].any() and not down[2].any()
    with pytest.raises(ValueError, match="no row"):
        low_rank.stacked([None, None])


def test_an_sd_size_layer_equals_peft_with_ranks_mixed_and_a_row_without():
    """SD 1.5's largest feed-forward output (1280 -> 320 features, 4096 tokens at 512 px): people's
    files of ranks 4, 8 and 16 and a row without an adapter, in one batch."""
    torch.manual_seed(0)
    layer = nn.Linear(1280, 320)
    adapters = {f"p{r}": random_adapter("proj", 1280, 320, r, seed=r) for r in (4, 8, 16)}
    names = ["p4", BASE, "p16", "p8", "p4"]
    x = torch.randn(len(names), 1024, 1280)
    rows = [adapters.get(n) for n in names]
    ours_model = nn.ModuleDict({"proj": layer})
    with torch.no_grad():
        plain = layer(x)
        with low_rank.added(ours_model, {"proj": low_rank.stacked([r["proj"] if r else None for r in rows])}):
            ours = ours_model["proj"](x)
        peft_model = peft_rows(nn.ModuleDict({"proj": nn.Linear(1280, 320)}), adapters, names)
        peft_model["proj"].base_layer.load_state_dict(layer.state_dict())
        theirs = peft_model["proj"](x)
    assert (ours - plain).abs().amax(dim=(1, 2)).min() == 0  # the row without an adapter: exactly the plain layer
    assert (ours - plain).abs().max() > 1.0
    # float32 sums in another order (CPU kernels differ between machines: 7.6e-5 seen on an AMD EPYC)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4), (ours - theirs).abs().max()


def test_the_unet_with_files_and_hyper_rows_equals_peft(diffusion):
    """Through the tiny UNet as serving runs it: two people's files of different ranks, two hyper-LoRA
    rows at different strengths (one shared A) and a row without; serving's batched path equals peft's
    mixed batch within 1e-5 (each of whose rows is known to be its adapter's alone)."""
    pipe = load_pipeline(diffusion)
    unet = pipe.unet
    hyper = HyperLora(40, target_layers(unet), rank=4, hidden=16)
    torch.nn.init.normal_(hyper.head.weight, std=0.5)  # a trained net's deltas are not zero
    styles = np.random.default_rng(0).normal(size=(2, 40)).astype(np.float32)
    files = {"ana": random_lora(unet, rank=2, seed=1, scale=0.5), "ben": random_lora(unet, rank=8, seed=2, scale=0.5)}
    loras = UserLoras(unet, None, max_loaded=4)
    sources = [LoraSource("ana", "ana", lambda: from_state_dict(files["ana"], unet)), None,
               LoraSource("h0", "cleo", lambda: hyper.low_rank(styles[0], 1.0)),
               LoraSource("ben", "ben", lambda: from_state_dict(files["ben"], unet)),
               LoraSource("h1", "dan", lambda: hyper.low_rank(styles[1], 0.4))]
    rows = loras.adapters(sources)
    x, t = torch.randn(len(rows), 4, 8, 8), torch.tensor([500])
    text = torch.randn(len(rows), 77, unet.config.cross_attention_dim)

    def run(model, batch: list[int]):
        n = len(batch)
        return model(x[batch], t, text[batch],
                     added_cond_kwargs={"image_embeds": [torch.zeros(n, 1, adapter_input_dim(pipe))]},
                     cross_attention_kwargs={"ip_adapter_masks": [torch.zeros(n, 1, 8, 8)]}).sample
    every = list(range(len(rows)))
    with torch.no_grad():
        plain = run(unet, every)
        with loras.per_sample(rows):
            ours = run(unet, every)
        names = ["ana", BASE, "h0", "ben", "h1"]
        theirs = run(peft_rows(unet, {n: r for n, r in zip(names, rows, strict=True) if r}, names), every)
    assert torch.equal(ours[1], plain[1])  # the row without an adapter is the plain model's, exactly
    assert all((ours[i] - plain[i]).abs().max() > 1e-3 for i in (0, 2, 3, 4))
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()  # float32 order, as above
    first = hyper.targets[0][0]
    assert rows[2][first].down.data_ptr() == rows[4][first].down.data_ptr()  # one A for every person


def test_a_file_serving_cannot_apply_is_refused_with_the_reason(diffusion):
    unet = load_pipeline(diffusion).unet
    good = random_lora(unet, rank=4, seed=0)
    layer = next(k for k in good if k.endswith("lora_A.weight")).removeprefix("unet.").removesuffix(".lora_A.weight")
    a, b = f"unet.{layer}.lora_A.weight", f"unet.{layer}.lora_B.weight"
    zeros = torch.zeros
    for bad, says in (({"lora_unet_down_blocks_0.lora_down.weight": zeros(4, 8)}, "diffusers/peft format"),
                      ({"unet.nowhere.lora_A.weight": zeros(4, 8), "unet.nowhere.lora_B.weight": zeros(8, 4)},
                       "not in the UNet"),
                      ({"unet.conv_in.lora_A.weight": zeros(4, 4), "unet.conv_in.lora_B.weight": zeros(4, 4)},
                       "only Linear layers"),
                      ({a: good[a]}, "lacks its lora_A or lora_B"),
                      ({a: zeros(4, 3), b: zeros(3, 4)}, "do not fit")):
        with pytest.raises(ValueError, match=says):
            from_state_dict(bad, unet)
    scaled = from_state_dict({**good, f"unet.{layer}.alpha": torch.tensor(2.0)}, unet)[layer]
    assert torch.allclose(scaled.up, good[b] * 2.0 / 4)
