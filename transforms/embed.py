"""Image embeddings with open_clip through Beam RunInference.

RunInference forms batches within a bundle. The ingestion pipeline reads each Kafka offset range
(up to `IngestConfig.max_events_per_partition`, 2,000 events) in one DoFn call, so a bundle carries
hundreds of photos and batches fill up to MAX_BATCH_SIZE (64) instead of the 1-3 that small default
bundles give. On a GPU the model runs in half precision.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache

import apache_beam as beam
import numpy as np
import torch
from apache_beam.ml.inference.base import KeyedModelHandler, ModelHandler, PredictionResult, RunInference

from stylestream.models.clip import ClipSpec, load_clip
from stylestream.transforms.records import Contribution, PreparedPhoto

MIN_BATCH_SIZE = 1
MAX_BATCH_SIZE = 64


@dataclass
class LoadedClip:  # a class, not a tuple: RunInference keeps a weak reference to the loaded model
    model: torch.nn.Module
    preprocess: Callable


class OpenClipImageHandler(ModelHandler[object, PredictionResult, LoadedClip]):
    """PIL images -> L2-normalized float32 image embeddings."""

    def __init__(self, spec: ClipSpec, device: str | None = None, max_batch_size: int = MAX_BATCH_SIZE):
        super().__init__()
        self._spec = spec
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._max_batch_size = max_batch_size

    def load_model(self) -> LoadedClip:
        return _loaded_clip(self._spec, self._device)

    def run_inference(self, batch: Sequence[object], model: LoadedClip,
                      inference_args=None) -> Iterable[PredictionResult]:
        dtype = next(model.model.parameters()).dtype
        pixels = torch.stack([model.preprocess(im) for im in batch]).to(self._device, dtype)
        with torch.inference_mode():
            emb = torch.nn.functional.normalize(model.model.encode_image(pixels).float(), dim=-1)
        return [PredictionResult(x, e) for x, e in zip(batch, emb.cpu().numpy().astype(np.float32), strict=True)]

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": MIN_BATCH_SIZE, "max_batch_size": self._max_batch_size}

    def share_model_across_processes(self) -> bool:
        return False


@cache
def _loaded_clip(spec: ClipSpec, device: str) -> LoadedClip:
    """One model per process: each ingestion cycle is a new pipeline, which would otherwise reload it."""
    model, preprocess, _ = load_clip(spec, device)
    if device.startswith("cuda"):
        model = model.half()
    return LoadedClip(model, preprocess)


def to_contribution(photo: PreparedPhoto, embedding: np.ndarray) -> Contribution:
    return Contribution(photo.source.event, embedding, photo.features, photo.metadata)


class EmbedPhotos(beam.PTransform):
    """PreparedPhoto -> Contribution (embedding + features + metadata; the image is dropped here)."""

    def __init__(self, spec: ClipSpec, max_batch_size: int = MAX_BATCH_SIZE):
        super().__init__()
        self._handler = KeyedModelHandler(OpenClipImageHandler(spec, max_batch_size=max_batch_size))

    def expand(self, photos):
        return (
            photos
            | "KeyByPhoto" >> beam.Map(lambda p: (p, p.image))
            | "RunInference" >> RunInference(self._handler)
            | "ToContribution" >> beam.MapTuple(lambda p, result: to_contribution(p, result.inference))
        )
