"""A small classifier of what a synthetic photo shows (its subject: demo/synthetic.py's SUBJECTS),
trained on the renderer's labels: the judge of whether a generated image shows what its prompt
asked for. It never sees the images it is judged on; it is trained here in seconds, at 64 px, on
renders softened as the tiny diffusion model's images are (a little blur, a little noise), and
reports its accuracy on renders it did not train on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch import nn

from stylestream.demo.synthetic import LOOKS, SUBJECTS, random_scene, render
from stylestream.models.style_training import to_pixels

RESOLUTION = 64


def _network() -> nn.Module:
    def block(i: int, o: int) -> list[nn.Module]:
        return [nn.Conv2d(i, o, 3, padding=1), nn.GroupNorm(8, o), nn.SiLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*block(3, 32), *block(32, 64), *block(64, 64), *block(64, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, len(SUBJECTS)))


def _softened(image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
    small = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0, 2.5))))
    x = to_pixels(small, RESOLUTION)
    return x + torch.from_numpy(rng.normal(0, rng.uniform(0, 0.08), x.shape).astype(np.float32))


def labelled_renders(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` renders of random looks and scenes, softened, as (pixels in [-1, 1], subject index)."""
    rng = np.random.default_rng(seed)
    looks = sorted(LOOKS)
    pixels, labels = [], []
    for i in range(n):
        photo_seed = seed * 1_000_003 + 90_000_000 + i  # far from the seeds of other synthetic photos
        scene = random_scene(photo_seed)
        pixels.append(_softened(render(LOOKS[looks[int(rng.integers(len(looks)))]], photo_seed, scene=scene), rng))
        labels.append(SUBJECTS.index(scene.subject))
    return torch.stack(pixels), torch.tensor(labels)


@dataclass
class SubjectClassifier:
    network: nn.Module
    held_out_accuracy: float  # on renders it did not train on

    def predict(self, images: Sequence[Image.Image]) -> list[str]:
        """The subject each image shows, by the classifier."""
        x = torch.stack([to_pixels(im, RESOLUTION) for im in images])
        with torch.no_grad():
            return [SUBJECTS[int(i)] for i in self.network(x).argmax(dim=1)]


def train_subject_classifier(images: int = 4000, steps: int = 600, batch_size: int = 64,
                             seed: int = 0) -> SubjectClassifier:
    """Train on `images` labelled renders (deterministic for a seed); measure on 400 others."""
    torch.manual_seed(seed)
    x, y = labelled_renders(images, seed)
    held_x, held_y = labelled_renders(400, seed + 1)
    network = _network()
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    network.train()
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        batch = x[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5  # no subject is told apart by its side
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
        loss = nn.functional.cross_entropy(network(batch), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    network.eval()
    with torch.no_grad():
        accuracy = float((network(held_x).argmax(dim=1) == held_y).float().mean())
    return SubjectClassifier(network, accuracy)
