"""Contrastive training of an open_clip model on image-caption pairs, with open_clip's own loss.

Used to teach the tiny CLIP words: the synthetic photos (demo/synthetic.py) come with captions
that name their look and what they show ("a warm photo of two stars on the left"). A photo can be
described at several levels of detail (its whole caption, the scene alone): each is a `Captions`
view, and the steps take the views in turn. Every batch holds distinct captions of one view, so
each image's negatives in the loss are truly other captions. Deterministic for a seed on one
device: each step draws from a generator seeded by (seed, step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import open_clip
import torch

from stylestream.models.style_training import step_generator


def encode_images(model, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Normalized image embeddings of preprocessed pixels (n, 3, h, w)."""
    with torch.no_grad():
        out = [model.encode_image(pixels[i:i + batch], normalize=True) for i in range(0, len(pixels), batch)]
    return torch.cat(out)


def encode_texts(model, tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """Normalized text embeddings, in the order given."""
    with torch.no_grad():
        return model.encode_text(tokenizer(list(texts)), normalize=True)


@dataclass(frozen=True)
class Captions:
    """One way of describing the images: image i's caption is `texts[ids[i]]`."""

    texts: Sequence[str]
    ids: torch.Tensor


def warmup_cosine(optimizer: torch.optim.Optimizer, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning rate over `steps`: a linear warm-up over the first 5%, then a cosine decay to 0."""
    warmup = max(1, steps // 20)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps))))


def train_clip(model, pixels: torch.Tensor, views: Sequence[Captions], tokenizer, steps: int, batch_size: int,
               learning_rate: float = 1e-3, seed: int = 0,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """Train `model` (an open_clip CLIP) in place on images `pixels` (preprocessed, (n, 3, h, w)) and
    their captions in each of `views`; returns the loss of every step.

    1. Step s takes view s mod len(views), `batch_size` of its distinct captions (or all, if fewer)
       and one image of each.
    2. Images and captions are encoded and scored with open_clip's ClipLoss (symmetric InfoNCE at the
       model's learned temperature), AdamW with a linear warm-up and cosine decay."""
    tokens = [tokenizer(list(v.texts)) for v in views]
    by_caption = [[torch.nonzero(v.ids == c).flatten() for c in range(len(v.texts))] for v in views]
    usable = [torch.tensor([c for c, idx in enumerate(found) if len(idx)]) for found in by_caption]
    loss_fn = open_clip.ClipLoss()
    # Weight decay as open_clip's training applies it: not to gains, biases or the temperature.
    def decayed(name: str, p: torch.nn.Parameter) -> bool:
        return not (p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name)
    named = list(model.named_parameters())
    optimizer = torch.optim.AdamW([{"params": [p for n, p in named if decayed(n, p)], "weight_decay": 0.1},
                                   {"params": [p for n, p in named if not decayed(n, p)], "weight_decay": 0.0}],
                                  lr=learning_rate)
    schedule = warmup_cosine(optimizer, steps)
    losses = []
    model.train()
    for step in range(steps):
        # 1. A view, distinct captions of it, one image of each
        g = step_generator(seed, step)
        v = step % len(views)
        chosen = usable[v][torch.randperm(len(usable[v]), generator=g)[:batch_size]]
        images = torch.stack([pixels[by_caption[v][c][torch.randint(len(by_caption[v][c]), (1,), generator=g)]][0]
                              for c in chosen.tolist()])
        # 2. The contrastive loss
        image_features = model.encode_image(images, normalize=True)
        text_features = model.encode_text(tokens[v][chosen], normalize=True)
        loss = loss_fn(image_features, text_features, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, np.log(100))  # as open_clip's training does
        losses.append(loss.item())
        if on_step:
            on_step(step + 1, losses[-1])
    model.eval()
    return losses


def top1_accuracy(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor, truth: torch.Tensor) -> float:
    """Share of images whose most similar text is `truth[i]`."""
    return float(((image_embeddings @ text_embeddings.T).argmax(dim=1) == truth).float().mean())
