"""The Flink job's environment: PyFlink and the project in a virtual environment of their own (PyFlink
pins apache-beam<=2.61 and pyarrow<21), and Flink's Kafka connector and Prometheus metric reporter jars
from Maven Central, all cached outside the project under ~/.cache/stylestream/flink/.

    python -m stylestream.pipelines.flink_setup     # build it if missing, print its Python (`make flink`)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "flink" / "requirements.txt"
POM = HERE / "flink" / "pom.xml"


def flink_home() -> Path:
    """The environment of these requirements (a new one when they change)."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    digest = hashlib.sha256(REQUIREMENTS.read_bytes() + POM.read_bytes()).hexdigest()[:12]
    return cache / "stylestream" / "flink" / digest


def flink_python() -> Path:
    return flink_home() / "venv" / "bin" / "python"


REPORTER_JAR = "flink-metrics-prometheus-*.jar"  # loaded at cluster start: installed into PyFlink's lib/


def connector_jars() -> list[Path]:
    """The jars the job hands to Flink (the reporter is not one: it sits in PyFlink's lib/)."""
    jars = flink_home() / "jars"
    return sorted(set(jars.glob("*.jar")) - set(jars.glob(REPORTER_JAR)))


def install_reporter(home: Path) -> None:
    """Flink's Prometheus reporter into the environment's PyFlink lib/ (its local cluster's classpath)."""
    lib = subprocess.run([str(flink_python()), "-c", "import os, pyflink; print(os.path.dirname(pyflink.__file__))"],
                         check=True, capture_output=True, text=True).stdout.strip()
    for jar in (home / "jars").glob(REPORTER_JAR):
        shutil.copy2(jar, Path(lib) / "lib" / jar.name)


def project_root() -> Path:
    root = HERE.parent
    if not (root / "pyproject.toml").exists():
        raise RuntimeError("the Flink environment is built from a source checkout of stylestream (pip install -e .)")
    return root


def ensure_flink() -> Path:
    """The Flink job's Python, after building its environment (a few minutes the first time). The
    environment is shared by every checkout on the machine and runs the project of the last one
    that asked: another checkout re-installs itself there (seconds)."""
    home = flink_home()
    pip = [str(flink_python()), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    root, serves = project_root(), home / ".project"
    if (home / ".complete").exists():
        if serves.exists() and serves.read_text() == str(root):
            return flink_python()
        subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True)
        serves.write_text(str(root))
        return flink_python()
    mvn = shutil.which("mvn")
    if mvn is None or shutil.which("java") is None:
        raise RuntimeError("the Flink job needs Java 17 and Maven (to fetch Flink's Kafka connector once)")
    print(f"building the Flink job's environment in {home} (once)", file=sys.stderr)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    subprocess.run([mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(POM), "dependency:copy-dependencies",
                    f"-DoutputDirectory={home / 'jars'}"], check=True)
    subprocess.run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(home / "venv")], check=True)
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    install_reporter(home)
    subprocess.run([*pip, "--no-deps", "-e", str(root)], check=True)
    serves.write_text(str(root))
    (home / ".complete").touch()
    return flink_python()


if __name__ == "__main__":
    print(ensure_flink())
