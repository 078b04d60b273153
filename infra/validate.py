#!/usr/bin/env python
"""Checks the deployment files offline, against the schemas of what runs them.

    python infra/validate.py [FILE ...]      # default: infra/compose.yaml and infra/k8s/*.yaml

- Compose files: the Compose Specification's JSON schema, as vendored by check-jsonschema (PyPI).
- Kubernetes resources of the core API (Deployment, Job, HorizontalPodAutoscaler, ...): the
  Kubernetes OpenAPI schemas that kubernetes-validate (PyPI) ships, strict (unknown fields fail).
- FlinkDeployment: the CRD's openAPIV3Schema from the Flink Kubernetes Operator's API jar
  (Maven Central; fetched once by `mvn` with infra/flink-operator/pom.xml into ~/.cache/stylestream).
Exit 1 with every problem listed, file and resource by name.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import kubernetes_validate
import yaml
from check_jsonschema.builtin_schemas import get_builtin_schema

HERE = Path(__file__).resolve().parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "stylestream" / "flink-operator"
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes the manifests promise to run on
CRD_IN_JAR = "META-INF/fabric8/flinkdeployments.flink.apache.org-v1.yml"


def flink_deployment_schemas() -> dict[str, dict]:
    """FlinkDeployment's schema per API version, from the operator's API jar."""
    jars = sorted(CACHE.glob("flink-kubernetes-operator-api-*.jar"))
    if not jars:
        mvn = shutil.which("mvn")
        if mvn is None:
            raise SystemExit("the FlinkDeployment schema needs `mvn` once (to fetch the operator's API jar)")
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(HERE / "flink-operator" / "pom.xml"),
                        "dependency:copy-dependencies", f"-DoutputDirectory={CACHE}"], check=True)
        jars = sorted(CACHE.glob("flink-kubernetes-operator-api-*.jar"))
    with zipfile.ZipFile(jars[-1]) as jar:
        crd = yaml.safe_load(jar.read(CRD_IN_JAR))
    return {f"{crd['spec']['group']}/{v['name']}": v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}


def compose_problems(path: Path) -> list[str]:
    schema = get_builtin_schema("vendor.compose-spec")
    doc = yaml.safe_load(path.read_text())
    return [f"{path.name}: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
            for e in jsonschema.validators.validator_for(schema)(schema).iter_errors(doc)]  # draft 2020-12


def kubernetes_problems(path: Path, flink: dict[str, dict]) -> list[str]:
    problems = []
    for doc in yaml.safe_load_all(path.read_text()):
        if not doc:
            continue
        name = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
        if doc.get("kind") == "FlinkDeployment":
            schema = flink.get(doc.get("apiVersion"))
            if schema is None:
                problems.append(f"{name}: unknown apiVersion {doc.get('apiVersion')} (known: {sorted(flink)})")
                continue
            problems += [f"{name}: {'/'.join(map(str, e.absolute_path))}: {e.message}"
                         for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
        else:
            try:
                kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                problems.append(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                problems.append(f"{name}: no schema: {e}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", type=Path, metavar="FILE")
    files = ap.parse_args(argv).files or [HERE / "compose.yaml", *sorted((HERE / "k8s").glob("*.yaml"))]
    flink = flink_deployment_schemas()
    problems = []
    for path in files:
        problems += compose_problems(path) if "compose" in path.name else kubernetes_problems(path, flink)
    for p in problems:
        print(p)
    print(f"{len(files)} files checked, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
