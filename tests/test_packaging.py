"""A non-editable install carries everything the package needs: the wheel, installed into a new
virtual environment away from the source tree, runs the demo."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


@pytest.mark.slow
def test_the_wheel_runs_the_demo_in_a_fresh_virtual_environment(tmp_path, broker_engine):
    # Built from a copy of the sources: a build/ folder left in the checkout could add stale files.
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", "stylestream-data", ".*_cache"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(tmp_path / "dist"),
                            str(source)], capture_output=True, text=True, check=True)
    assert "Warning" not in built.stderr, built.stderr  # every data folder declared
    wheel = next((tmp_path / "dist").glob("stylestream-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for data in ("stylestream/schemas/json/style-vectors.schema.json", "stylestream/streams/kafka/pom.xml",
                 "stylestream/models/configs/diffusion/tiny-style.json",
                 "stylestream/models/trained/tiny-style/ip-adapter.safetensors",
                 "stylestream/models/trained/tiny-clip/stylestream-tiny-clip.safetensors"):
        assert data in names, data
    shipped = sum(i.file_size for i in zipfile.ZipFile(wheel).infolist() if "/models/trained/" in i.filename)
    assert shipped < 30 * 2**20, f"the trained tiny models take {shipped / 2**20:.1f} MiB"

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # The dependencies (several GB with torch) come from this environment's site-packages, appended
    # after the new one's, so `stylestream` itself can only come from the wheel.
    site = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True)

    away = tmp_path / "elsewhere"
    away.mkdir()
    where = subprocess.run([venv / "bin" / "python", "-c", "import stylestream; print(stylestream.__file__)"],
                           cwd=away, capture_output=True, text=True, check=True).stdout
    assert where.startswith(site), where
    demo = subprocess.run([venv / "bin" / "stylestream", "demo", "--data-dir", str(away / "data"), "--broker",
                           broker_engine], cwd=away, capture_output=True, text=True, timeout=600)
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "done in" in demo.stdout and list((away / "data" / "runs").glob("*/personalization.png"))
