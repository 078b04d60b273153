"""One configuration of ingestion for every runner: the local driver (`stylestream ingest`), the Beam
streaming pipeline (`pipelines/streaming.py`, Prism) and the Flink job (`pipelines/flink_job.py`) all
build their model, decoding, basis and keys from an `IngestSettings`, so the same photos give the same
style code and manifest whichever runs them.

A deployment can keep it as a JSON file (`--config FILE`: a Kubernetes ConfigMap, say); command-line
options given beside it win. The keys are files named here (default: under the state folder; in
Kubernetes, mounted Secrets): the runners' workers only read them, and only the command that starts
a deployment creates them, saying so, when they do not exist yet.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, fields
from functools import cached_property
from pathlib import Path

from stylestream.defaults import HALF_LIFE_DAYS, MIN_HALF_LIFE_DAYS, TINY_CLIP
from stylestream.pipelines.layout import DataLayout, StateLayout
from stylestream.streams.topics import DEFAULT_PARTITIONS


class SettingsError(ValueError):
    """Settings that cannot be used (a bad value, a key file missing, another basis than the state's)."""


@dataclass(frozen=True)
class IngestSettings:
    data_dir: Path
    clip_model: str = TINY_CLIP
    clip_pretrained: str | None = None  # open_clip tag or checkpoint; none: the tiny model under DATA_DIR/models
    half_life_days: float = HALF_LIFE_DAYS
    mask_faces: bool = False
    jpeg_device: str | None = None  # decode JPEGs a batch at a time there ("cuda": nvJPEG); None: Pillow
    max_photo_bytes: int = 50 * 1024 * 1024
    min_side: int = 224  # decode at reduced size, never below this
    partitions: int = DEFAULT_PARTITIONS  # of the topics created when missing: bounds read parallelism
    parallelism: int = 2  # of the Flink job
    analytics_key_file: Path | None = None  # default: DATA_DIR/state/analytics.key
    signing_key_file: Path | None = None  # default: DATA_DIR/state/erasure-signing.key

    def __post_init__(self):
        if self.half_life_days < MIN_HALF_LIFE_DAYS:
            raise SettingsError(f"half-life must be at least {MIN_HALF_LIFE_DAYS} days, got {self.half_life_days}")
        if self.parallelism < 1 or self.partitions < 1:
            raise SettingsError("parallelism and partitions must be at least 1")
        if self.jpeg_device is not None:
            from stylestream.transforms.images import check_jpeg_device

            try:  # the name only: a launcher may set the workers' device without one of its own
                check_jpeg_device(self.jpeg_device, here=False)
            except ValueError as e:
                raise SettingsError(str(e)) from None

    # --- what the runners build from them --------------------------------------------------------------

    @property
    def state(self) -> StateLayout:
        return DataLayout(self.data_dir).state

    @cached_property
    def clip(self):
        """The embedding model (models/clip.ClipSpec); the tiny default is written under DATA_DIR/models."""
        from stylestream.models.clip import clip_spec

        return clip_spec(DataLayout(self.data_dir).models, self.clip_model, self.clip_pretrained)

    @property
    def limits(self):
        """How photos are decoded (transforms/images.DecodeLimits), library:// photos from this state's registry."""
        from stylestream.transforms.images import DecodeLimits

        return DecodeLimits(max_bytes=self.max_photo_bytes, min_side=self.min_side, mask_faces=self.mask_faces,
                            jpeg_device=self.jpeg_device, libraries=str(self.state.libraries))

    @property
    def basis(self):
        """What every version is computed from besides the photos (schemas/events.StyleBasis)."""
        from stylestream.transforms.manifest import style_basis

        return style_basis(self.clip, self.half_life_days, self.limits)

    @property
    def analytics_key_path(self) -> Path:
        return self.analytics_key_file or self.state.analytics_key

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.state.signing_key

    def analytics_key(self) -> bytes:
        """The key of pseudonyms and erasure subjects, read from its file (never made here)."""
        from stylestream.analytics.pseudonyms import load_key

        try:
            return load_key(self.analytics_key_path)
        except FileNotFoundError:
            raise SettingsError(f"no analytics key at {self.analytics_key_path}: start the deployment with "
                                "the command that creates it, or mount it there") from None

    def ensure_keys(self, say=print) -> None:
        """For the command that starts a deployment: the keys under the state folder are created where
        they do not exist yet, saying so; key files named in the settings (Secrets) must exist."""
        from stylestream.analytics.pseudonyms import new_key
        from stylestream.keyfiles import create_once, new_ed25519_pem

        for named, path, make, what in (
                (self.analytics_key_file, self.analytics_key_path, new_key, "analytics key"),
                (self.signing_key_file, self.signing_key_path, new_ed25519_pem, "receipt-signing key")):
            if path.exists():
                continue
            if named is not None:
                raise SettingsError(f"no {what} at {path} (named in the settings): mount it there; keys are "
                                    "never made on a machine that only reads them")
            create_once(path, make())
            say(f"created the {what} at {path}: keep it with the state's backups")

    def check_basis(self) -> None:
        """Remembers the basis beside the state on first use; refuses another one later (a state or
        checkpoint whose styles were computed otherwise), as the local driver's store does."""
        path = self.state.basis
        want = self.basis.model_dump()
        if path.exists():
            have = json.loads(path.read_text())
            clash = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if clash:
                raise SettingsError(f"the state at {self.state.root} was computed otherwise {clash} (stored, "
                                    "configured): use the stored settings, or a new --data-dir")
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(want, indent=2, sort_keys=True))

    # --- reading them ------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}, indent=2)

    @classmethod
    def from_file(cls, path: Path, **overrides) -> IngestSettings:
        """Settings from a JSON file, with `overrides` (those not None) on top."""
        try:
            raw = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise SettingsError(f"cannot read settings from {path}: {e}") from None
        known = {f.name for f in fields(cls)}
        if unknown := set(raw) - known:
            raise SettingsError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
        return cls.of(**(raw | {k: v for k, v in overrides.items() if v is not None}))

    @classmethod
    def of(cls, **values) -> IngestSettings:
        paths = {"data_dir", "analytics_key_file", "signing_key_file"}
        return cls(**{k: Path(v) if k in paths and v is not None else v for k, v in values.items()})


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """The settings as options of a runner's command line (pipelines/streaming.py, pipelines/flink_job.py)."""
    ap.add_argument("--config", type=Path, metavar="FILE", help="settings as JSON (IngestSettings' fields); "
                    "the options below win over it")
    ap.add_argument("--data-dir", type=Path, metavar="DIR", help="the deployment's folder: state/ (history, keys, "
                    "basis), models/, checkpoints/")
    ap.add_argument("--clip-model", metavar="NAME", help=f"open_clip architecture (default {TINY_CLIP})")
    ap.add_argument("--clip-pretrained", metavar="TAG|FILE", help="open_clip tag or checkpoint path, readable by "
                    "every worker (default: the tiny model's checkpoint under DIR/models)")
    ap.add_argument("--half-life-days", type=float, metavar="DAYS", help=f"default {HALF_LIFE_DAYS:g}")
    ap.add_argument("--mask-faces", action="store_true", default=None, help="fill faces before features and embedding")
    ap.add_argument("--jpeg-device", metavar="DEVICE", help="decode JPEGs a batch at a time on this torch device "
                    "(cuda: nvJPEG; part of the style's basis); default: Pillow, one by one on every core")
    ap.add_argument("--parallelism", type=int, metavar="N", help="the Flink job's parallelism (default 2)")
    ap.add_argument("--partitions", type=int, metavar="N", help="of topics created when missing "
                    f"(default {DEFAULT_PARTITIONS})")


def from_arguments(args: argparse.Namespace) -> IngestSettings:
    """The settings `add_arguments`' options give; exits with a one-line message when they cannot be used."""
    given = {k: getattr(args, k) for k in ("data_dir", "clip_model", "clip_pretrained", "half_life_days",
                                           "mask_faces", "jpeg_device", "parallelism", "partitions")}
    try:
        if args.config:
            return IngestSettings.from_file(args.config, **given)
        if given["data_dir"] is None:
            raise SettingsError("give --data-dir (or --config with data_dir)")
        return IngestSettings.of(**{k: v for k, v in given.items() if v is not None})
    except (SettingsError, TypeError) as e:
        sys.exit(f"error: {e}")


__all__ = ["IngestSettings", "SettingsError", "add_arguments", "from_arguments"]
