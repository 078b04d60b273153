"""The deployment files pass their schemas offline (infra/validate.py), and the check fails on a
broken compose file, a broken Kubernetes resource and a broken FlinkDeployment."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

INFRA = Path(__file__).parent.parent / "infra"


def validate(*files: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(INFRA / "validate.py"), *map(str, files)],
                          capture_output=True, text=True, timeout=600)


def test_the_deployment_files_pass_their_schemas():
    out = validate()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "5 files checked, 0 problems" in out.stdout


def test_broken_files_are_caught(tmp_path):
    compose = tmp_path / "compose.yaml"
    compose.write_text((INFRA / "compose.yaml").read_text().replace("stop_signal: SIGTERM", "stop_sgnal: SIGTERM", 1))
    serving = tmp_path / "serving.yaml"
    serving.write_text((INFRA / "k8s" / "serving.yaml").read_text().replace("replicas: 1", "replicas: one"))
    flink = tmp_path / "flink.yaml"
    flink.write_text((INFRA / "k8s" / "flink-deployment.yaml").read_text().replace("v1_20", "v0_9"))
    out = validate(compose, serving, flink)
    assert out.returncode == 1
    assert "compose.yaml: services/ingest: Unevaluated properties are not allowed ('stop_sgnal'" in out.stdout
    assert "serving.yaml: Deployment stylestream-serve: spec/replicas:" in out.stdout
    assert "flink.yaml: FlinkDeployment stylestream-flink: spec/flinkVersion: 'v0_9' is not one of" in out.stdout
    assert "3 files checked, 3 problems" in out.stdout
