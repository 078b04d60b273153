"""Image embeddings with open_clip through Beam RunInference.

RunInference forms batches within a bundle. The ingestion pipeline reads each Kafka offset range
(up to `IngestConfig.max_events_per_partition`, 2,000 events) in one DoFn call, so a bundle carries
hundreds of photos and batches fill up to MAX_BATCH_SIZE (64) instead of the 1-3 that small default
bundles give. On a GPU the model runs in half precision.
"""

from __future__ import annotations

import concurrent.futures
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult, RunInference
from PIL import Image

from stylestream.models.clip import ClipSpec, load_clip
from stylestream.transforms.features import aesthetic_features
from stylestream.transforms.records import Contribution, PreparedPhoto, file_sha256, kept_upload

MIN_BATCH_SIZE = 1
MAX_BATCH_SIZE = 64


@dataclass
class LoadedClip:  # a class, not a tuple: RunInference keeps a weak reference to the loaded model
    model: torch.nn.Module
    preprocess: Callable


def itself(example: Image.Image) -> Image.Image:
    return example


def photo_image(photo: PreparedPhoto) -> Image.Image:
    return photo.image


class OpenClipImageHandler(ModelHandler[object, PredictionResult, LoadedClip]):
    """Examples -> L2-normalized float32 embeddings of their images (`image_of(example)`; by default
    the examples are PIL images). Predictions carry the example, so nothing needs keying."""

    def __init__(self, spec: ClipSpec, device: str | None = None, max_batch_size: int = MAX_BATCH_SIZE,
                 image_of: Callable[[object], Image.Image] = itself):
        super().__init__()
        self._spec = spec
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._max_batch_size = max_batch_size
        self._image_of = image_of

    def load_model(self) -> LoadedClip:
        return _loaded_clip(self._spec, self._device)

    def run_inference(self, batch: Sequence[object], model: LoadedClip,
                      inference_args=None) -> Iterable[PredictionResult]:
        dtype = next(model.model.parameters()).dtype
        # On every core, as decoding is: resizing a batch's images one by one would serialize the step.
        tensors = _preprocess_pool().map(lambda x: model.preprocess(self._image_of(x)), batch)
        pixels = torch.stack(list(tensors)).to(self._device, dtype)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(model.model.encode_image(pixels).float(), dim=-1)
        return [PredictionResult(x, e) for x, e in zip(batch, emb.cpu().numpy().astype(np.float32), strict=True)]

    def get_num_bytes(self, batch: Sequence[object]) -> int:
        # For RunInference's metrics; the default pickles the whole batch, images included.
        return sum(3 * im.width * im.height for im in map(self._image_of, batch))

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": MIN_BATCH_SIZE, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return False


_LOADING = threading.Lock()


@cache
def _preprocess_pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool per process for the model's preprocessing (Pillow and torch release the GIL)."""
    return concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="preprocess")


def _loaded_clip(spec: ClipSpec, device: str) -> LoadedClip:
    """One model per process: each ingestion cycle is a new pipeline run, which would otherwise reload
    it; threads that ask at once (a runner's parallel workers) wait for the one load."""
    with _LOADING:
        return _load_clip_once(spec, device)


@cache
def _load_clip_once(spec: ClipSpec, device: str) -> LoadedClip:
    model, preprocess, _ = load_clip(spec, device)
    if device.startswith("cuda"):
        model = model.half()
    return LoadedClip(model, preprocess)


def to_contribution(photo: PreparedPhoto, embedding: np.ndarray) -> Contribution:
    event = photo.source.event
    return Contribution(kept_upload(event), embedding, photo.features, photo.metadata, file_sha256(event),
                        offset=photo.source.offset)


class EmbedPhotos(beam.PTransform):
    """PreparedPhoto -> Contribution (embedding + features + metadata; the image is dropped here)."""

    def __init__(self, spec: ClipSpec, max_batch_size: int = MAX_BATCH_SIZE):
        super().__init__()
        self._handler = OpenClipImageHandler(spec, max_batch_size=max_batch_size, image_of=photo_image)

    def expand(self, photos):
        return (
            photos
            | "RunInference" >> RunInference(self._handler)
            | "ToContribution" >> beam.Map(lambda result: to_contribution(result.example, result.inference))
        )


def embed_images(handler: OpenClipImageHandler, model: LoadedClip, images: Sequence[Image.Image]) -> np.ndarray:
    """The embeddings of decoded images, one row each, through ingestion's handler, a batch at a time."""
    size = handler.batch_elements_kwargs()["max_batch_size"]
    return np.stack([r.inference for start in range(0, len(images), size)
                     for r in handler.run_inference(images[start:start + size], model)])


def image_styles(handler: OpenClipImageHandler, model: LoadedClip,
                 images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, aesthetic features) of decoded images, one row each, through the same handler
    and feature code ingestion uses (for training data, benchmarks and checks outside a pipeline)."""
    return embed_images(handler, model, images), np.stack([aesthetic_features(im) for im in images])
