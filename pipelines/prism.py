"""Prism, Beam's portable local runner: a Go program, built from the Go module proxy at the very
release of the installed Beam Python SDK (SDK and runner must agree), cached outside the project.

    python -m stylestream.pipelines.prism      # build it if missing, print its path (`make prism`)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import apache_beam

MODULE = "github.com/apache/beam/sdks/v2/go/cmd/prism"


def prism_path() -> Path:
    """Where the Prism of the installed Beam release lives."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return cache / "stylestream" / "prism" / f"v{apache_beam.__version__}" / "prism"


def ensure_prism() -> Path:
    """Prism's path, building it first (`go install`, about a minute the first time) if missing."""
    path = prism_path()
    if path.exists():
        return path
    go = shutil.which("go")
    if go is None:
        raise RuntimeError(f"Prism is not built and Go is not on PATH: install Go, then run `make prism` "
                           f"(it runs `go install {MODULE}@v{apache_beam.__version__}`)")
    print(f"building Prism {apache_beam.__version__} with {go} (once; cached in {path.parent})", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([go, "install", f"{MODULE}@v{apache_beam.__version__}"], check=True,
                   env={**os.environ, "GOBIN": str(path.parent), "GOFLAGS": "-modcacherw"})
    return path


if __name__ == "__main__":
    print(ensure_prism())
