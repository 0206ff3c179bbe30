"""What ``model.id`` / ``--model`` accepts: a named model, a local directory, a GGUF file,
a hub id (only online); one-line errors otherwise."""

from __future__ import annotations

import os

import pytest

from components.config import ModelConfig
from components.errors import UserError
from components.base_model import resolve_model
from components.models import check_model_id, find_smollm2_gguf, model_kind


def test_model_kinds(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"GGUF....")
    assert model_kind("smollm2-135m-instruct") == "smollm2"
    assert model_kind("tiny-llama") == "tiny"
    assert model_kind(str(tmp_path)) == "dir"
    assert model_kind(str(tmp_path / "m.gguf")) == "gguf"
    assert model_kind("HuggingFaceTB/SmolLM2-135M-Instruct") == "hub"
    assert model_kind("/no/such/model") == "missing"
    assert model_kind("./not/here") == "missing"


def test_local_and_gguf_mistakes_are_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_text("not a gguf")
    with pytest.raises(UserError) as e:
        check_model_id(ModelConfig(id=str(junk)))
    assert str(e.value) == f"model.id: {junk}: not a GGUF file (it does not start with the GGUF magic bytes)"
    with pytest.raises(UserError) as e:
        check_model_id(ModelConfig(id=str(tmp_path)))
    assert str(e.value) == f"model.id: {tmp_path}: expected a transformers model directory with config.json"
    with pytest.raises(UserError) as e:
        check_model_id(ModelConfig(id="/no/such/model"))
    assert str(e.value) == ("model.id: '/no/such/model' is neither smollm2-135m-instruct, tiny-llama nor an existing "
                            "local directory, .gguf file or hub id (owner/name)")


def test_hub_id_needs_the_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError) as e:
        check_model_id(ModelConfig(id="someorg/some-model"), tmp_path)
    assert str(e.value) == (
        "model.id: 'someorg/some-model' is no local path and looks like a Hugging Face Hub id, but HF_HUB_OFFLINE "
        "is set and it is not in the cache; set HF_HUB_OFFLINE=0 to download it, or give a local directory or "
        ".gguf file"
    )


@pytest.mark.real_model
def test_a_gguf_file_is_converted_once_and_found_by_digest(tmp_path):
    """The packaged SmolLM2 GGUF given as a file path resolves to the same cached
    safetensors directory as ``smollm2-135m-instruct``."""
    cache = os.environ.get("CL_AUDIT_TEST_HOME")
    cache = (tmp_path / "home" if cache is None else __import__("pathlib").Path(cache)) / "cache"
    named = resolve_model(ModelConfig(id="smollm2-135m-instruct"), cache, [], 0)
    by_path = resolve_model(ModelConfig(id=str(find_smollm2_gguf())), cache, [], 0)
    assert by_path == named and (by_path / "model.safetensors").exists()
