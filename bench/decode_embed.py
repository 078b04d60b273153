#!/usr/bin/env python
"""Is ingest bound by the model or by decoding? 12-megapixel JPEGs, side by side in one run:

  full path    fetch bytes -> verify sha256 -> decode (JPEG draft) + orientation + colour -> whitelisted
               metadata -> aesthetic features on the pipeline's own decoding step (PreparePhotos' DoFn,
               one thread per core), overlapped with CLIP preprocess -> image embedding, batched as
               in the pipeline's RunInference step (the same functions the pipeline calls)
  decode only  the decoding step alone, on one thread and on one per core (decode_scaling: all / one),
               alternated twice (the machine's speed drifts)
  model only   the embedding forward pass alone on the same preprocessed tensors, same batch size,
               before and after the others (their mean: the machine's speed drifts)

twice: once decoding the 12-MP originals, once with events that also reference a ~1-MP preview
rendition (as photo services keep), which the pipeline then decodes instead. Where CUDA is present,
JPEGs are decoded in batches with nvJPEG (`--jpeg-device`; `none` for Pillow on every core). The model
defaults to ViT-B-32 at its real size with random weights (nothing is downloaded). Final line: one JSON object
with photos_per_s, decode_only_per_s, decode_one_core_per_s, decode_scaling, model_only_per_s and
ratio (full path / model only) for the rendition path, per_core figures, and the same for the
originals under `originals`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from apache_beam.transforms.window import GlobalWindow
from PIL import Image

from stylestream.demo.synthetic import LOOKS, exif_with_private_fields, render
from stylestream.models.clip import ClipSpec
from stylestream.schemas.events import ImageRef, PhotoUploaded
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.images import DecodeLimits, PrepareOnThreads
from stylestream.transforms.records import Sourced


def camera_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A camera-like JPEG: the synthetic scene upscaled with sensor-like noise, quality 90, with EXIF."""
    base = render(LOOKS[sorted(LOOKS)[seed % len(LOOKS)]], seed, (size[0] // 8, size[1] // 8))
    big = np.asarray(base.resize(size, Image.Resampling.BICUBIC), np.float32)
    big += np.random.default_rng(seed).normal(0, 6, big.shape).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(np.clip(big, 0, 255).astype(np.uint8)).save(
        buf, "JPEG", quality=90, exif=exif_with_private_fields(datetime(2025, 6, 1, tzinfo=UTC)))
    return buf.getvalue()


def ref(path: Path, data: bytes, size: tuple[int, int]) -> ImageRef:
    return ImageRef(uri=path.as_uri(), sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data),
                    width=size[0], height=size[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--photos", type=int, default=16, help="distinct 12-MP photos (each used several times)")
    ap.add_argument("--n", type=int, default=64, help="photos per timed pass")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clip-model", default="ViT-B-32")
    ap.add_argument("--clip-pretrained", default=None, help="checkpoint; random weights when omitted")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--jpeg-device", default="cuda" if torch.cuda.is_available() else "none",
                    help="where JPEGs are decoded in batches (cuda: nvJPEG); none: Pillow, one by one")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="decode-embed-"))
    full_size, preview_size = (4032, 3024), (1152, 864)

    t0 = time.perf_counter()
    events = {"original": [], "rendition": []}
    for i in range(a.photos):
        data = camera_jpeg(i, full_size)
        path = work / f"p{i}.jpg"
        path.write_bytes(data)
        preview = io.BytesIO()
        Image.open(io.BytesIO(data)).resize(preview_size, Image.Resampling.BILINEAR).save(preview, "JPEG", quality=85)
        ppath = work / f"p{i}-preview.jpg"
        ppath.write_bytes(preview.getvalue())
        common = dict(event_id=f"e{i}", user_id="u", event_time=datetime.now(UTC), photo_id=f"p{i}",
                      image=ref(path, data, full_size))
        events["original"].append(PhotoUploaded(**common))
        events["rendition"].append(PhotoUploaded(**common, renditions=[ref(ppath, preview.getvalue(), preview_size)]))
    mean_mb = np.mean([e.image.size_bytes for e in events["original"]]) / 1e6
    print(json.dumps({"bench": "corpus", "photos": a.photos, "size": full_size, "mean_mb": round(mean_mb, 2),
                      "preview": preview_size, "make_s": round(time.perf_counter() - t0, 1)}), flush=True)

    handler = OpenClipImageHandler(ClipSpec(a.clip_model, a.clip_pretrained), device=a.device)
    model = handler.load_model()
    limits = DecodeLimits(jpeg_device=None if a.jpeg_device == "none" else a.jpeg_device)
    cores = os.cpu_count() or 1

    def decoded(evs: list[PhotoUploaded], workers: int) -> Iterator[Image.Image]:
        """The pipeline's decoding step, run in-process on `workers` threads, in input order."""
        step = PrepareOnThreads(limits, workers)
        step.setup()
        step.start_bundle()
        try:
            for i, e in enumerate(evs):
                for out in step.process(Sourced(e, "photo-events", 0, i, b""), 0, GlobalWindow()):
                    yield out.value.image
            for out in step.finish_bundle():
                yield out.value.image
        finally:
            step.teardown()

    def full_path(evs: list[PhotoUploaded]) -> None:
        """Decoding on every core while the model embeds the batches already decoded."""
        batch = []
        for image in decoded(evs, cores):
            batch.append(image)
            if len(batch) == a.batch:
                handler.run_inference(batch, model)
                batch = []
        if batch:
            handler.run_inference(batch, model)

    def timed(fn, n: int) -> float:
        fn()  # warm-up
        t = time.perf_counter()
        fn()
        return n / (time.perf_counter() - t)

    results = {}
    for kind, evs in events.items():
        batch = (evs * (a.n // len(evs) + 1))[: a.n]
        images = list(decoded(batch, cores))
        pixels = torch.stack([model.preprocess(im) for im in images]).to(a.device, next(model.model.parameters()).dtype)

        def model_only(px=pixels):
            with torch.inference_mode():
                for s in range(0, len(px), a.batch):
                    model.model.encode_image(px[s:s + a.batch])
            if a.device.startswith("cuda"):
                torch.cuda.synchronize()
        # The model alone before and after the rest, compared by their mean: the machine's speed drifts.
        model_before = timed(model_only, a.n)
        photos_per_s = timed(lambda b=batch: full_path(b), a.n)
        alternated = [timed(lambda b=batch, w=w: sum(1 for _ in decoded(b, w)), a.n)
                      for _ in range(2) for w in (cores, 1)]
        decode_all, decode_one = np.mean(alternated[0::2]), np.mean(alternated[1::2])
        model_per_s = (model_before + timed(model_only, a.n)) / 2
        results[kind] = {"photos_per_s": round(photos_per_s, 2), "decode_only_per_s": round(decode_all, 2),
                         "decode_one_core_per_s": round(decode_one, 2),
                         "decode_scaling": round(decode_all / decode_one, 3),
                         "model_only_per_s": round(model_per_s, 2), "ratio": round(photos_per_s / model_per_s, 3),
                         "per_core": {"photos_per_s": round(photos_per_s / cores, 2),
                                      "decode_only_per_s": round(decode_all / cores, 2)}}
        print(json.dumps({"bench": "decode_embed", "decode": kind, **results[kind]}), flush=True)

    print(json.dumps({"bench": "decode_embed", "model": a.clip_model, "device": a.device, "jpeg_device": a.jpeg_device,
                      "machine": f"{platform.machine()} {cores} cores", "batch": a.batch, "n": a.n,
                      **results["rendition"], "originals": results["original"]}))


if __name__ == "__main__":
    main()
