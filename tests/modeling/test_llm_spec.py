"""`ModelSpec`: the one parser of model specs that the chat and the personalization back ends share."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modeling.llm import CHAT_SPECS, LLMError, ModelSpec


def test_it_reads_an_endpoint_and_its_served_name() -> None:
    spec = ModelSpec.parse("http://127.0.0.1:8000/v1#my-adapter")

    assert (spec.kind, spec.url, spec.name, spec.path, spec.adapter) == (
        "http",
        "http://127.0.0.1:8000/v1",
        "my-adapter",
        None,
        None,
    )
    assert not spec.is_local


def test_it_reads_a_local_directory_with_or_without_a_prefix(tmp_path: Path) -> None:
    for text in (str(tmp_path), f"hf:{tmp_path}"):
        spec = ModelSpec.parse(text)
        assert (spec.kind, spec.path, spec.adapter, spec.is_local) == ("hf", tmp_path, None, True)

    vllm = ModelSpec.parse(f"vllm:{tmp_path}")
    assert (vllm.kind, vllm.path, vllm.is_local) == ("vllm", tmp_path, False)


def test_it_puts_an_adapter_on_the_base_model_its_config_names(tmp_path: Path) -> None:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))

    spec = ModelSpec.parse(f"hf:{adapter}")

    assert (spec.path, spec.adapter) == (base, adapter)


def test_it_names_what_is_wrong_with_a_bad_spec(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(LLMError, match=r"^spec 'http://h/v1' needs the model name after '#'"):
        ModelSpec.parse("http://h/v1")
    with pytest.raises(LLMError, match=r"^LLM spec 'http://h/v1' needs the model name after '#'"):
        ModelSpec.parse("http://h/v1", CHAT_SPECS)
    with pytest.raises(LLMError, match=f"^spec 'vllm:{missing}': {missing} is not a directory$"):
        ModelSpec.parse(f"vllm:{missing}")
    with pytest.raises(LLMError, match=r"^unknown generation spec 'gpt-x': expected "):
        ModelSpec.parse("gpt-x")
    with pytest.raises(LLMError, match=r"^unknown LLM spec 'vllm:/x': expected "):
        ModelSpec.parse("vllm:/x", CHAT_SPECS)
    (tmp_path / "adapter_config.json").write_text("[]")
    with pytest.raises(LLMError, match="adapter_config.json is not a JSON object"):
        ModelSpec.parse(str(tmp_path))
