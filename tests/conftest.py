"""Shared fixtures: an isolated run folder, the tiny model config, one local Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "tests" / "configs" / "tiny.yaml"
SCHEMA = ROOT / "tests" / "data" / "summary.schema.json"


@pytest.fixture(scope="session")
def home(tmp_path_factory) -> Path:
    """A run folder (store, cache, mlflow.db) shared by the tests of one session.

    With ``CL_AUDIT_TEST_CACHE`` set, its ``cache/`` (the built tiny model, the converted
    SmolLM2) is that folder, kept between sessions; the store and MLflow stay fresh."""
    h = tmp_path_factory.mktemp("clhome")
    cache = os.environ.get("CL_AUDIT_TEST_CACHE")  # reuse built models between sessions if given
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        (h / "cache").symlink_to(Path(cache).resolve())
    os.environ["CL_AUDIT_HOME"] = str(h)
    return h


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the session (2 CPUs), shut down at the end."""
    import ray

    from pipelines.dag import init_ray

    init_ray()
    yield ray
    ray.shutdown()


def tiny_config(*overrides: str):
    from components.config import load_config

    return load_config(config_file=TINY, overrides=list(overrides))


@pytest.fixture(scope="session")
def tiny_run(home, ray_local, tmp_path_factory):
    """One complete audit of the tiny model through Ray and a sqlite MLflow store."""
    from pipelines.audit import run_audit

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("tinyrun")
    summary = run_audit(cfg, out, home)
    return cfg, out, summary
