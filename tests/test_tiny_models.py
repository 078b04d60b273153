"""The tiny models that know words: captioned synthetic photos, the tiny CLIP trained on them, its text
tower as the diffusion model's text encoder, and the training option that keeps what a photo shows
out of the style path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stylestream.demo.synthetic import LOOKS, POSITIONS, SUBJECTS, Scene, make_library, random_scene, render
from stylestream.models import clip_training
from stylestream.models.clip import TRAINED_TINY_CLIP, ClipSpec, load_clip, text_encoder_from_clip
from stylestream.models.style_training import group_conditions, rate_factor
from stylestream.models.tiny_style import clip_figures, clip_photos, clip_views
from stylestream.schemas.tables import FEATURE_NAMES


def test_a_scene_says_what_it_shows():
    assert Scene("star", 2, "left").caption == "two stars on the left"
    assert Scene("house", 1, "centre").caption == "one house in the centre"
    assert Scene("tree", 3, "right").labels == {"subject": "tree", "count": 3, "position": "right"}
    assert Scene("cross", 2, "right").caption == "two crosses on the right"
    drawn = {random_scene(seed) for seed in range(400)}
    assert {s.subject for s in drawn} == set(SUBJECTS) and {s.position for s in drawn} == set(POSITIONS)
    assert {s.count for s in drawn} == {1, 2, 3}
    assert {random_scene(seed, ("tree", "ring")).subject for seed in range(50)} == {"tree", "ring"}


@pytest.mark.parametrize("look", ["mono", "warm", "pastel"])
@pytest.mark.parametrize("subject", SUBJECTS)
def test_the_subject_is_drawn_where_its_caption_says(look, subject):
    # Same seed, same look, the scene moved from the left to the right: the two pictures differ in
    # both halves of the centred square, never across its middle and nowhere outside it.
    left = np.asarray(render(LOOKS[look], 7, scene=Scene(subject, 1, "left")), float)
    right = np.asarray(render(LOOKS[look], 7, scene=Scene(subject, 1, "right")), float)
    changed = np.abs(left - right).sum(axis=(0, 2)) > 0
    x0, side = 40, 240  # 320 x 240: the centred square spans x 40..280
    square, middle = changed[x0:x0 + side], slice(side // 2 - 2, side // 2 + 2)
    halves = [square[:middle.start].mean(), square[middle.stop:].mean()]
    assert min(halves) > 0.3 and not square[middle].any(), halves
    assert not changed[:x0].any() and not changed[x0 + side:].any()


def test_a_library_album_can_show_mostly_one_subject(tmp_path):
    photos = make_library(tmp_path, {"ana": [("stars", "warm", 6, ("star",)), ("any", "cool", 6)]})
    assert [p.scene.subject for p in photos if p.album_id == "stars"] == ["star"] * 6
    assert len({p.scene.subject for p in photos if p.album_id == "any"}) > 2


def test_the_clip_text_tower_as_a_text_encoder_gives_the_same_token_states(clip):
    model, _, tokenizer = load_clip(clip)
    tokens = tokenizer(["two stars on the left", "a warm photo of one house in the centre"])
    encoder = text_encoder_from_clip(model)
    with torch.no_grad():
        x = model.token_embedding(tokens) + model.positional_embedding
        theirs = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        ours = encoder(tokens).last_hidden_state
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    other = text_encoder_from_clip(load_clip(ClipSpec(clip.model, None))[0])  # the seeded random weights
    with torch.no_grad():
        assert (other(tokens).last_hidden_state - theirs).abs().max() > 0.1


def test_the_shipped_tiny_clip_names_what_photos_it_never_saw_show(clip):
    assert clip.pretrained == str(TRAINED_TINY_CLIP)
    model, preprocess, tokenizer = load_clip(clip)
    pixels, photos = clip_photos(150, 3, preprocess)  # seeds apart from its training and its own check
    figures = clip_figures(model, tokenizer, pixels, photos)
    # Chance: 1/432, 1/72 and 1/8.
    assert figures["caption_top1"] >= 0.8 and figures["scene_top1"] >= 0.8, figures
    assert figures["subject_top1"] >= 0.85, figures


def test_clip_training_lowers_the_loss_and_repeats_for_a_seed(clip):
    def run() -> list[float]:
        model, preprocess, tokenizer = load_clip(ClipSpec(clip.model, None))  # seeded random weights
        pixels, photos = clip_photos(48, 5, preprocess)
        return clip_training.train_clip(model, pixels, clip_views(photos), tokenizer, steps=30, batch_size=16)
    first, second = run(), run()
    assert first == second
    assert np.mean(first[-6:]) < np.mean(first[:6])


def test_without_its_own_style_an_image_is_conditioned_on_other_images_of_its_group():
    # One-hot embeddings: component i of a condition is non-zero exactly when image i is in it.
    n = 6
    embeddings, features = np.eye(n, 8, dtype=np.float32), np.zeros((n, len(FEATURE_NAMES)), np.float32)
    groups = ["a"] * 3 + ["b"] * 3
    others_only = group_conditions(embeddings, features, groups, 8, seed=0, own_style=False)
    with_own = group_conditions(embeddings, features, groups, 8, seed=0)
    for i in range(n):
        group = [j for j in range(n) if groups[j] == groups[i]]
        assert np.all(others_only[i, :, i] == 0)
        assert np.all(others_only[i][:, [j for j in range(n) if j not in group]] == 0)
        assert others_only[i][:, [j for j in group if j != i]].sum() > 0
        assert with_own[i, 0, i] > 0
    with pytest.raises(ValueError, match="one image"):
        group_conditions(embeddings[:3], features[:3], ["a", "b", "b"], 8, seed=0, own_style=False)


def test_the_learning_rate_is_constant_then_decays_over_the_last_steps():
    assert [rate_factor(s, 8, 4) for s in range(8)] == [1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
    assert {rate_factor(s, 8, 0) for s in range(8)} == {1.0}
    # the constant part does not depend on the run's length: a longer run can resume a shorter one
    assert [rate_factor(s, 100, 4) for s in range(8)] == [1.0] * 8
