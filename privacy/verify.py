"""Checking a style version from the person's own photos: `stylestream verify`.

The manifest (style-manifests topic, `stylestream style manifest`) lists the photos that count by
sha256 and weight, and the basis they were computed with. Verifying recomputes the style code from
the manifest, finds each listed photo among the person's files by its sha256, decodes and embeds it
exactly as ingestion does (transforms/images.style_image, the same open_clip handler), takes the
weighted mean by the style's own rule and compares it with the published vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stylestream.models.clip import ClipSpec, weights_id
from stylestream.pipelines.library import photo_files
from stylestream.schemas.events import StyleBasis, StyleManifest
from stylestream.schemas.tables import FEATURE_NAMES
from stylestream.transforms.embed import OpenClipImageHandler
from stylestream.transforms.images import DecodeLimits, PhotoError, check_jpeg_device, style_image
from stylestream.transforms.manifest import style_code
from stylestream.transforms.style import stats_of

TOLERANCE = 1e-4


class CannotVerify(ValueError):
    """The manifest cannot be checked here (another model, another preprocessing)."""


@dataclass
class Verification:
    code_matches: bool  # the manifest's code is the hash of its basis and photos
    found: int  # listed photos found among the files
    missing: list[str] = field(default_factory=list)  # photo ids with no file of their sha256
    unreadable: dict[str, str] = field(default_factory=dict)  # photo id -> why it could not be decoded
    embedding_diff: float | None = None  # largest absolute difference from the published vector
    features_diff: float | None = None

    @property
    def vector_matches(self) -> bool:
        return (not self.missing and not self.unreadable and self.embedding_diff is not None
                and self.embedding_diff <= TOLERANCE and self.features_diff <= TOLERANCE)


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_by_sha256(folder: Path) -> dict[str, Path]:
    """Every photo file under `folder`, by the sha256 of its bytes."""
    return {file_sha256(p): p for p in photo_files(folder)}


def decode_limits(basis: StyleBasis) -> DecodeLimits:
    """The decoding a manifest's basis names, if this version of the code does it on this machine."""
    known = [DecodeLimits(mask_faces=mask, jpeg_device=device)
             for mask in (False, True) for device in (None, "cpu", "cuda")]
    for limits in known:
        if limits.preprocessing == basis.preprocessing:
            if limits.jpeg_device:
                try:
                    check_jpeg_device(limits.jpeg_device)
                except ValueError as e:
                    raise CannotVerify(f"the manifest's JPEGs were decoded in batches on {limits.jpeg_device}, "
                                       f"which verifying repeats: {e}") from None
            return limits
    raise CannotVerify(f"the manifest was computed with preprocessing {basis.preprocessing!r}, "
                       f"which this version cannot repeat (only {', '.join(repr(k.preprocessing) for k in known)})")


def check_model(manifest: StyleManifest, clip: ClipSpec) -> None:
    if clip.model != manifest.basis.model or weights_id(clip) != manifest.basis.weights:
        raise CannotVerify(f"the manifest was computed with {manifest.basis.model} ({manifest.basis.weights}); "
                           f"the model given here is {clip.model} ({weights_id(clip)})")


def verify(manifest: StyleManifest, files: dict[str, Path], clip: ClipSpec,
           on_photo: Callable[[], None] | None = None) -> Verification:
    """Recompute the manifest's vector from `files` (sha256 -> path) and compare."""
    check_model(manifest, clip)
    limits = decode_limits(manifest.basis)
    result = Verification(code_matches=style_code(manifest.basis, manifest.photos) == manifest.style_code, found=0)
    handler = OpenClipImageHandler(clip)
    model = handler.load_model()
    embeddings, features, weights = [], [], []
    for photo in manifest.photos:
        path = files.get(photo.sha256 or "")
        if path is None:
            result.missing.append(photo.photo_id)
        else:
            result.found += 1
            try:
                image, feats, _ = style_image(path.read_bytes(), limits)
            except PhotoError as e:
                result.unreadable[photo.photo_id] = str(e)
            else:
                [embedded] = handler.run_inference([image], model)
                embeddings.append(embedded.inference)
                features.append(feats)
                weights.append(photo.weight)
        if on_photo:
            on_photo()
    if embeddings and not result.missing and not result.unreadable:
        emb, feat = stats_of(np.stack(embeddings), np.stack(features), np.array(weights)).vector()
        published = np.array([manifest.features[n] for n in FEATURE_NAMES])
        result.embedding_diff = float(np.abs(emb - np.array(manifest.embedding)).max())
        result.features_diff = float(np.abs(feat - published).max())
    return result


def photos_in_set(manifest: StyleManifest, paths: Iterable[Path]) -> dict[Path, str | None]:
    """For each file: the photo id it counts as in this version, or None if it does not count."""
    listed = {p.sha256: p.photo_id for p in manifest.photos if p.sha256}
    return {path: listed.get(file_sha256(path)) for path in paths}
