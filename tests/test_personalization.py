"""Personalization: training the style adapter and hyper-LoRA, loading them as serving does, per-sample
hyper-LoRA in mixed batches, strength 0, and the shipped tiny model really following each style."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime

import numpy as np
import pytest
import torch
from helpers import produce, read_topic
from PIL import Image
from safetensors.torch import load_file
from typer.testing import CliRunner

from stylestream.cli.main import app
from stylestream.demo.synthetic import LOOKS, make_library, render
from stylestream.models import low_rank
from stylestream.models.diffusion import IP_ADAPTER_FILE, DiffusionSpec, adapter_input_dim, load_pipeline
from stylestream.models.hyper_lora import HYPER_LORA_FILE, HyperLora, target_layers
from stylestream.models.style_training import TrainConfig, list_images, train_style
from stylestream.models.tiny_style import ensure_tiny_style
from stylestream.schemas.events import GenerationRequested, StyleVectorUpdated, parse_event
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.serving.generator import StyleGenerator
from stylestream.streams.topics import GENERATION_REQUESTS, GENERATION_RESULTS, STYLE_VECTORS
from stylestream.transforms.embed import OpenClipImageHandler, image_styles
from stylestream.transforms.facets import find_facets
from stylestream.transforms.images import DecodeLimits, decode
from stylestream.transforms.style import stats_of, style_of
from stylestream.transforms.vectors import style_vector_event


def diff(a, b) -> int:
    return int(np.abs(np.asarray(a, int) - np.asarray(b, int)).max())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """Two looks, four 64-px images each, one folder per look (a group each)."""
    root = tmp_path_factory.mktemp("train-images")
    for look in ("warm", "mono"):
        (root / look).mkdir()
        for i in range(4):
            render(LOOKS[look], i, (96, 96)).resize((64, 64)).save(root / look / f"{i}.png")
    return root


def test_training_is_deterministic_resumable_and_loads_into_serving(image_folder, diffusion, clip, tmp_path):
    def config(out: str, steps: int, decay_steps: int) -> TrainConfig:
        return TrainConfig(images=image_folder, diffusion_model=diffusion.model_dir, clip=clip,
                           output=tmp_path / out, steps=steps, batch_size=4, learning_rate=1e-3,
                           decay_steps=decay_steps, checkpoint_every=1, prompts=["a photo", "a card"])

    straight = train_style(config("straight", 4, 2))
    train_style(config("resumed", 2, 0))
    # continues from its checkpoint at step 2, where the longer run's decay begins
    resumed = train_style(config("resumed", 4, 2))
    assert straight["steps"] == resumed["steps"] == 4 and straight["images"] == 8 and straight["groups"] == 2
    for name in (IP_ADAPTER_FILE, HYPER_LORA_FILE):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "resumed" / name)
        assert a.keys() == b.keys()
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), name
    first = load_file(tmp_path / "straight" / IP_ADAPTER_FILE)
    init = load_file(tmp_path / "straight" / "init" / IP_ADAPTER_FILE)
    assert any(not torch.equal(first[k], init[k]) for k in first)  # training moved the adapter
    assert (tmp_path / "straight" / "loss.png").stat().st_size > 1000

    # what `serve --diffusion-model ... --ip-adapter ... --hyper-lora ...` loads
    spec = DiffusionSpec(diffusion.model_dir, str(tmp_path / "straight" / IP_ADAPTER_FILE),
                         str(tmp_path / "straight" / HYPER_LORA_FILE))
    gen = StyleGenerator(spec, clip, device="cpu")
    style = style_event("ana", 1, np.full(gen.style_dim, 0.1, np.float32))
    image, facet = gen.generate(request("ana", "r1"), style)
    assert image.size == (64, 64) and facet is None and gen.hyper is not None


def test_training_refuses_to_resume_with_other_settings(image_folder, diffusion, clip, tmp_path):
    cfg = TrainConfig(images=image_folder, diffusion_model=diffusion.model_dir, clip=clip, output=tmp_path / "o",
                      steps=1, batch_size=2)
    train_style(cfg)
    with pytest.raises(ValueError, match="other settings"):
        train_style(dataclasses.replace(cfg, learning_rate=0.5, steps=2))


def test_manifest_lists_images_groups_and_captions(image_folder, tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(f'{{"path": "{image_folder}/warm/0.png", "group": "ana", "caption": "a beach"}}\n\n'
                        f'{{"path": "{image_folder}/mono/0.png"}}\n')
    rows = list_images(manifest)
    assert [(g, c) for _, g, c in rows] == [("ana", "a beach"), (f"{image_folder}/mono/0.png", None)]
    manifest.write_text('{"no path": 1}\n')
    with pytest.raises(ValueError, match=r"m.jsonl:1"):
        list_images(manifest)


def test_train_adapter_command(image_folder, diffusion, tmp_path):
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, [
        "train-adapter", str(image_folder), "--output", str(out), "--diffusion-model", diffusion.model_dir,
        "--steps", "2", "--batch-size", "2", "--data-dir", str(tmp_path / "data")], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "2 steps on 8 images" in result.output and "--hyper-lora" in result.output
    assert (out / IP_ADAPTER_FILE).exists() and (out / HYPER_LORA_FILE).exists() and (out / "loss.png").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    for args, code, says in (([str(empty), "--diffusion-model", diffusion.model_dir], 1, "no images"),
                             ([str(image_folder), "--diffusion-model", str(empty)], 2, "not a diffusers pipeline")):
        result = CliRunner().invoke(app, ["train-adapter", *args, "--output", str(tmp_path / "o2"), "--steps", "1",
                                          "--data-dir", str(tmp_path / "data")], env={"COLUMNS": "200"})
        assert result.exit_code == code and says in result.output and "Traceback" not in result.output, result.output


def test_hyper_lora_served_equals_the_training_form_and_peft(diffusion):
    """What serving adds for one person (`low_rank`) is exactly the delta training adds, and the same
    deltas loaded into the UNet as a peft LoRA give the same output."""
    pipe = load_pipeline(diffusion)
    unet = pipe.unet
    hyper = HyperLora(40, target_layers(unet), rank=4, hidden=16)
    torch.nn.init.normal_(hyper.head.weight, std=0.5)  # a trained net's deltas are not zero
    style = np.random.default_rng(0).normal(size=40).astype(np.float32)
    x, t = torch.randn(1, 4, 8, 8), torch.tensor([500])
    text = torch.randn(1, 77, unet.config.cross_attention_dim)
    kwargs = {"added_cond_kwargs": {"image_embeds": [torch.zeros(1, 1, adapter_input_dim(pipe))]},
              "cross_attention_kwargs": {"ip_adapter_masks": [torch.zeros(1, 1, 8, 8)]}}
    served = hyper.low_rank(style, 0.7)
    with torch.no_grad():
        base = unet(x, t, text, **kwargs).sample
        with low_rank.added(unet, hyper.layer_deltas(torch.from_numpy(style)[None], torch.tensor([0.7]))):
            trained = unet(x, t, text, **kwargs).sample
        with low_rank.added(unet, {layer: low_rank.stacked([d]) for layer, d in served.items()}):
            serving = unet(x, t, text, **kwargs).sample
        pipe.load_lora_weights({k: v for layer, d in served.items() for k, v in (
            (f"unet.{layer}.lora_A.weight", d.down), (f"unet.{layer}.lora_B.weight", d.up))}, adapter_name="ana")
        peft = unet(x, t, text, **kwargs).sample
    assert (trained - base).abs().max() > 1e-3
    assert torch.equal(serving, trained)
    assert torch.allclose(trained, peft, atol=1e-5)


# -- The shipped tiny style model ------------------------------------------------------------------

def request(user: str, rid: str, **kw) -> GenerationRequested:
    kw = {"prompt": "a birthday card with a cake", "seed": 11, "facet": "overall", **kw}
    return GenerationRequested(event_id=f"e-{rid}", user_id=user, event_time=datetime.now(UTC), request_id=rid, **kw)


def style_event(user: str, version: int, vector: np.ndarray) -> StyleVectorUpdated:
    emb, feats = vector[:-len(FEATURE_NAMES)], vector[-len(FEATURE_NAMES):]
    return StyleVectorUpdated(event_id=f"{user}:{version}", user_id=user, event_time=datetime.now(UTC),
                              version=version, photo_count=4, embedding=emb.tolist(),
                              features=dict(zip(FEATURE_NAMES, feats.tolist(), strict=True)))


@pytest.fixture(scope="module")
def tiny(clip):
    return ensure_tiny_style(clip.pretrained)


@pytest.fixture(scope="module")
def look_styles(clip, tmp_path_factory):
    """The style of eight photos of each look, by ingestion's rule."""
    handler = OpenClipImageHandler(clip, device="cpu")
    model = handler.load_model()
    styles = {}
    for version, look in enumerate(sorted(LOOKS), start=1):
        images = [render(LOOKS[look], 900 + i) for i in range(8)]
        emb, feats = image_styles(handler, model, images)
        e, f = style_of(emb, feats, np.ones(len(images)))
        styles[look] = style_event(look, version, np.concatenate([e, f]))
    return styles


def test_serve_loads_the_trained_adapter_and_hyper_lora_through_its_flags(broker, tiny, look_styles, tmp_path):
    bs = broker.bootstrap_servers
    produce(bs, STYLE_VECTORS, [look_styles["warm"]])
    produce(bs, GENERATION_REQUESTS, [request("warm", "cli-1")])
    result = CliRunner().invoke(app, [
        "serve", "-b", bs, "--data-dir", str(tmp_path), "--diffusion-model", tiny.model_dir,
        "--ip-adapter", tiny.ip_adapter, "--hyper-lora", tiny.hyper_lora, "--max-requests", "1"])
    assert result.exit_code == 0, result.output
    assert "hyper-lora.safetensors" in result.output
    [done] = [parse_event(GENERATION_RESULTS, m.value) for m in read_topic(bs, GENERATION_RESULTS)]
    assert done.type == "generation_completed" and done.lora and done.style_version == look_styles["warm"].version
    with pytest.raises(ValueError, match="rebuild the tiny one"):  # a CLIP with other weights cannot use it
        ensure_tiny_style(str(tmp_path / "other-clip.safetensors"))


def test_mixed_batch_with_hyper_lora_equals_single_user_runs(tiny, clip, look_styles):
    gen = StyleGenerator(tiny, clip, device="cpu", max_loras=3)
    hyper_only = StyleGenerator(tiny, clip, device="cpu", use_ip_adapter=False)
    none = StyleGenerator(dataclasses.replace(tiny, hyper_lora=None), clip, device="cpu", use_ip_adapter=False)
    users = ["warm", "cool", "mono", "pastel"]
    reqs = [request(u, f"m{i}", seed=20 + i, style_strength=0.0 if u == "pastel" else 1.0)
            for i, u in enumerate(users)]
    conds = [gen.condition(r, look_styles[r.user_id]) for r in reqs]
    assert all(c.lora is not None and c.lora.style_version == look_styles[c.lora.user_id].version for c in conds[:3])
    assert conds[3].lora is None  # strength 0: no adapter at all, while the others have theirs
    batch = gen.generate_batch(reqs, conds)
    alone = [gen.generate_batch([r], [c])[0] for r, c in zip(reqs, conds, strict=True)]
    assert all(diff(b, a) <= 2 for b, a in zip(batch, alone, strict=True))  # each row: its own style only
    assert diff(alone[3], none.generate(reqs[3], None)[0]) == 0
    # the hyper-LoRA alone changes the image, each person's differently
    reqs = reqs[:3]
    plain = [none.generate(r, look_styles[r.user_id])[0] for r in reqs]
    hyper = hyper_only.generate_batch(reqs, [hyper_only.condition(r, look_styles[r.user_id]) for r in reqs])
    assert all(diff(h, p) > 10 for h, p in zip(hyper, plain, strict=True))
    assert len(gen.loras.loaded()) == 3
    gen.loras.drop_versions(lambda user, version: user == "cool")  # a withdrawn version takes its adapter along
    assert not any("/cool/" in key for key in gen.loras.loaded()) and len(gen.loras.loaded()) == 2


def test_strength_zero_is_the_same_image_for_everyone(tiny, clip, look_styles):
    gen = StyleGenerator(tiny, clip, device="cpu")
    none = StyleGenerator(dataclasses.replace(tiny, hyper_lora=None), clip, device="cpu", use_ip_adapter=False)
    reqs = [request(u, f"z{u}", style_strength=0.0) for u in ("warm", "cool", "mono")]
    conds = [gen.condition(r, look_styles[r.user_id]) for r in reqs]
    assert all(c.lora is None for c in conds)
    images = gen.generate_batch(reqs, conds)
    unpersonalized = none.generate_batch(reqs, [none.condition(r, None) for r in reqs])
    assert [diff(a, b) for a, b in zip(images, unpersonalized, strict=True)] == [0, 0, 0]
    alone = [gen.generate(r, look_styles[r.user_id])[0] for r in reqs]  # same seed: the same image for all
    assert diff(alone[0], alone[1]) == diff(alone[0], alone[2]) == diff(alone[0], none.generate(reqs[0], None)[0]) == 0
    guided = request("warm", "g", style_strength=0.0, guidance_scale=3.0)  # guided: still no style in any row
    assert diff(gen.generate(guided, look_styles["warm"])[0], none.generate(guided, None)[0]) == 0
    # The guidance is the prompt's: with the prompt as its own negative, both rows are the same and
    # guiding changes nothing (it would amplify the style if the rows without the prompt had none).
    plain = request("warm", "p", prompt="two stars on the left")
    guided = request("warm", "p", prompt=plain.prompt, negative_prompt=plain.prompt, guidance_scale=3.0)
    assert diff(gen.generate(plain, look_styles["warm"])[0], gen.generate(guided, look_styles["warm"])[0]) <= 2
    personalized = [gen.generate(request(u, f"o{u}"), look_styles[u])[0] for u in ("warm", "cool", "mono")]
    assert min(diff(a, b) for i, a in enumerate(personalized) for b in personalized[i + 1:]) > 30


@pytest.mark.slow
def test_generated_images_follow_their_persons_style(tiny, clip, look_styles):
    """The shipped model learned: each image's style is nearest its own look's, and nearer with
    more strength (the benchmark measures the same at a larger size)."""
    from stylestream.transforms.facets import style_space

    handler = OpenClipImageHandler(clip, device="cpu")
    model = handler.load_model()
    gen = StyleGenerator(tiny, clip, device="cpu")
    looks = sorted(look_styles)
    vectors = [look_styles[k] for k in looks]
    space = style_space(np.stack([v.embedding for v in vectors]),
                        np.stack([[v.features[n] for n in FEATURE_NAMES] for v in vectors]))
    targets = space(np.stack([v.embedding for v in vectors]),
                    np.stack([[v.features[n] for n in FEATURE_NAMES] for v in vectors]))
    distances = {}
    for strength in (0.0, 0.5, 1.0):
        reqs = [request(k, f"q{k}{s}{strength}", seed=s, style_strength=strength, num_inference_steps=20)
                for s in (1, 2) for k in looks]
        images: list[Image.Image] = gen.generate_batch(reqs, [gen.condition(r, look_styles[r.user_id]) for r in reqs])
        points = space(*image_styles(handler, model, images))
        d = np.linalg.norm(points[:, None] - targets[None], axis=-1)  # (images, looks)
        own = np.array([looks.index(r.user_id) for r in reqs])
        distances[strength] = float(d[np.arange(len(reqs)), own].mean())
        if strength == 1.0:
            assert (d.argmin(1) == own).mean() >= 0.9, d.argmin(1)
    assert distances[1.0] < distances[0.5] < distances[0.0]


def test_the_facet_a_prompt_picks_is_the_one_that_shows_what_it_names(tiny, clip, tmp_path):
    """A person with two tastes tied to two subjects (warm stars, cool houses): serving's "auto" facet
    for a prompt naming one subject is the facet of the photos that show it, by the tiny CLIP."""
    photos = make_library(tmp_path, {"ana": [("stars", "warm", 8, ("star",)), ("houses", "cool", 8, ("house",))]})
    handler = OpenClipImageHandler(clip, device="cpu")
    emb, feats = image_styles(handler, handler.load_model(), [decode(p.path.read_bytes(), DecodeLimits())[0]
                                                               for p in photos])
    weights = np.ones(len(photos))
    facets = find_facets([p.photo_id for p in photos], emb, feats, weights)
    album_of = {p.photo_id: p.album_id for p in photos}
    assert sorted(tuple(sorted({album_of[i] for i in f.photo_ids})) for f in facets) == [("houses",), ("stars",)]
    style = style_vector_event("ana", 1, stats_of(emb, feats, weights), facets, [], None, datetime.now(UTC))
    gen = StyleGenerator(tiny, clip, device="cpu")
    for prompt, album in (("two stars on the left", "stars"), ("one star in the centre", "stars"),
                          ("three stars on the right", "stars"), ("one house in the centre", "houses"),
                          ("two houses on the left", "houses"), ("three houses on the right", "houses")):
        picked = gen.pick_facet(request("ana", "f", prompt=prompt, facet="auto"), style)
        assert {album_of[i] for i in facets[picked].photo_ids} == {album}, prompt


def darkest_third(image: Image.Image) -> str:
    """Where an image's subject stands: the third of its columns that is darkest (every look draws its
    subject at the dark end of its values, on a sky that is the same across the columns)."""
    lum = np.asarray(image.convert("L"), np.float64).mean(0)
    return ("left", "centre", "right")[int(np.argmin([part.mean() for part in np.array_split(lum, 3)]))]


@pytest.mark.slow
def test_the_prompt_says_where_and_the_person_says_how(tiny, clip, look_styles):
    """A prompt change moves the subject and keeps the look; a person change keeps the subject's place
    and changes the look (the place by the darkest third, the look by the named features)."""
    gen = StyleGenerator(tiny, clip, device="cpu")
    people, sides, named = ("warm", "cool", "mono"), ("left", "right"), ["warmth", "saturation", "brightness"]
    reqs = [request(p, f"w{p}{side}{s}", prompt=f"one house on the {side}", seed=s, num_inference_steps=20,
                    guidance_scale=4.0) for side in sides for p in people for s in (1, 2)]
    images = gen.generate_batch(reqs, [gen.condition(r, look_styles[r.user_id]) for r in reqs])
    placed = [darkest_third(im) == r.prompt.split()[-1] for im, r in zip(images, reqs, strict=True)]
    assert np.mean(placed) >= 0.9, placed
    handler = OpenClipImageHandler(clip, device="cpu")
    _, feats = image_styles(handler, handler.load_model(), images)
    look = feats[:, [FEATURE_NAMES.index(n) for n in named]]
    key = [(r.user_id, r.prompt, r.seed) for r in reqs]
    pairs = [(i, j) for i in range(len(key)) for j in range(i + 1, len(key)) if key[i][2] == key[j][2]]
    same_person = [np.abs(look[i] - look[j]).mean() for i, j in pairs
                   if key[i][0] == key[j][0] and key[i][1] != key[j][1]]
    same_prompt = [np.abs(look[i] - look[j]).mean() for i, j in pairs
                   if key[i][0] != key[j][0] and key[i][1] == key[j][1]]
    # Every person change moves the look more than any prompt change, and five times as much on average.
    assert max(same_person) < min(same_prompt) and np.mean(same_person) < np.mean(same_prompt) / 5, \
        (same_person, same_prompt)
