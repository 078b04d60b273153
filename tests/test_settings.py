"""One configuration for every runner (pipelines/settings.py): the same basis from the same settings,
another basis refused, keys named in the settings never made."""

from __future__ import annotations

import json

import pytest
import torch

from stylestream.models.clip import weights_id
from stylestream.pipelines.settings import IngestSettings, SettingsError
from stylestream.privacy.verify import CannotVerify, decode_limits
from stylestream.transforms.images import DecodeLimits, PrepareOnThreads


def test_the_default_model_is_the_tiny_checkpoint_so_every_runner_names_the_same_weights(tmp_path, clip):
    settings = IngestSettings(tmp_path)
    assert settings.basis.weights == weights_id(clip) and settings.basis.weights.startswith("sha256:")
    assert settings.limits.libraries == str(settings.state.libraries)


def test_a_settings_file_is_read_and_options_win_over_it(tmp_path):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps({"data_dir": str(tmp_path / "d"), "half_life_days": 90, "mask_faces": True}))
    settings = IngestSettings.from_file(path, half_life_days=120.0, mask_faces=None)
    assert (settings.half_life_days, settings.mask_faces, settings.data_dir) == (120.0, True, tmp_path / "d")
    assert settings.basis.preprocessing.endswith("+mask-faces")
    path.write_text(json.dumps({"data_dir": "d", "half_lives": 3}))
    with pytest.raises(SettingsError, match="unknown settings"):
        IngestSettings.from_file(path)


def test_a_state_made_with_another_basis_is_refused(tmp_path):
    IngestSettings(tmp_path, half_life_days=365).check_basis()
    IngestSettings(tmp_path, half_life_days=365).check_basis()  # the same: fine
    with pytest.raises(SettingsError, match="half_life_days"):
        IngestSettings(tmp_path, half_life_days=90).check_basis()
    with pytest.raises(SettingsError, match="preprocessing"):
        IngestSettings(tmp_path, mask_faces=True).check_basis()


def test_keys_under_the_state_are_made_once_and_named_keys_never(tmp_path):
    said = []
    IngestSettings(tmp_path).ensure_keys(say=said.append)
    IngestSettings(tmp_path).ensure_keys(say=said.append)
    assert len(said) == 2 and all("created" in line for line in said)  # two keys, made once
    named = IngestSettings(tmp_path / "other", analytics_key_file=tmp_path / "secrets" / "analytics.key")
    with pytest.raises(SettingsError, match="never made"):
        named.ensure_keys(say=said.append)
    assert not (tmp_path / "secrets").exists()
    with pytest.raises(SettingsError, match="no analytics key"):
        named.analytics_key()


def test_decoding_jpegs_in_batches_is_part_of_the_basis_and_verifying_repeats_it(tmp_path):
    settings = IngestSettings(tmp_path, jpeg_device="cpu")
    assert settings.limits.jpeg_device == "cpu" and settings.basis.preprocessing.endswith("+jpeg-batch-cpu")
    assert decode_limits(settings.basis) == DecodeLimits(jpeg_device="cpu")
    settings.check_basis()
    with pytest.raises(SettingsError, match="preprocessing"):
        IngestSettings(tmp_path).check_basis()
    for device in ("meta", "cuda:1"):  # a basis names the decoder, not which GPU of a machine
        with pytest.raises(SettingsError, match="runs on cpu or cuda"):
            IngestSettings(tmp_path, jpeg_device=device)
    # a launcher without a GPU may set its workers' device; the workers' decoding step checks it
    assert IngestSettings(tmp_path / "other", jpeg_device="cuda").limits.jpeg_device == "cuda"
    cuda = IngestSettings(tmp_path).basis.model_copy(update={"preprocessing": "decode-v1+jpeg-batch-cuda"})
    if not torch.cuda.is_available():  # a style ingested with nvJPEG is verified where CUDA is, never guessed
        with pytest.raises(ValueError, match="no CUDA GPU"):
            PrepareOnThreads(DecodeLimits(jpeg_device="cuda"), workers=1).setup()
        with pytest.raises(CannotVerify, match="decoded in batches on cuda"):
            decode_limits(cuda)
    else:
        assert decode_limits(cuda).jpeg_device == "cuda"
    with pytest.raises(CannotVerify, match="cannot repeat"):
        decode_limits(cuda.model_copy(update={"preprocessing": "decode-v0"}))
