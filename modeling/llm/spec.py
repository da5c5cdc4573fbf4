"""One parser for the one-string model specs of configs and the CLI (``ModelSpec``), and the chat back
end a spec names (``backend_from_spec``).

A spec is ``http(s)://host:port/v1#model-name`` (an OpenAI-compatible endpoint and the served name),
``vllm:/path/to/dir`` (vLLM's offline engine), or ``hf:/path/to/dir`` or just an existing directory (a
local Hugging Face model). A local directory holding a peft adapter loads on top of the base model its
``adapter_config.json`` names.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .chat import ChatBackend, LLMError
from .openai_compat import OpenAICompatBackend
from .transformers_backend import TransformersBackend

SpecKind = Literal["http", "vllm", "hf"]


@dataclass(frozen=True)
class SpecForms:
    """Which spec forms a reader takes, and how its error messages name a spec.

    ``label`` starts the messages about a malformed spec of a known form; ``unknown`` is the message for
    a spec of no form taken (formatted with ``spec``)."""

    kinds: tuple[SpecKind, ...]
    label: str
    unknown: str


# The specs the chat back ends (data engine, judges) take.
CHAT_SPECS = SpecForms(
    ("http", "hf"),
    "LLM spec",
    "unknown LLM spec {spec!r}: expected 'http(s)://host:port/v1#model' or 'hf:/path/to/model-dir'",
)
# The specs the personalization back ends (``modeling.infer``) take.
GENERATION_SPECS = SpecForms(
    ("http", "vllm", "hf"),
    "spec",
    "unknown generation spec {spec!r}: expected 'http(s)://host:port/v1#model', 'vllm:/dir' or 'hf:/dir'",
)


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    kind: "http" (an OpenAI-compatible endpoint), "vllm" (vLLM's offline engine on a local directory)
        or "hf" (a local directory loaded with transformers).
    text: the spec as written.
    url, name: the endpoint's base URL and the served model name (kind "http").
    path: the base model's directory (kinds "vllm" and "hf"): the directory given, or, when that holds a
        peft adapter, the base model its ``adapter_config.json`` names.
    adapter: the adapter directory, or None.
    """

    kind: SpecKind
    text: str
    url: str | None = None
    name: str | None = None
    path: Path | None = None
    adapter: Path | None = None

    @property
    def is_local(self) -> bool:
        """Whether the model loads in this process through transformers (so a device and dtype apply)."""
        return self.kind == "hf"

    @classmethod
    def parse(cls, spec: str, forms: SpecForms = GENERATION_SPECS) -> ModelSpec:
        """Parse ``spec`` as ``forms`` reads it (by default every form, as ``modeling.infer`` does).

        A local spec's directory must exist, and an adapter's base model must be a local directory;
        anything else is a one-line ``LLMError``."""
        if spec.startswith(("http://", "https://")):
            url, _, name = spec.partition("#")
            if not name:
                raise LLMError(
                    f"{forms.label} {spec!r} needs the model name after '#', "
                    "e.g. http://127.0.0.1:8000/v1#my-model"
                )
            return cls("http", spec, url=url, name=name)
        kind, raw = _local_kind(spec)
        path = Path(raw).expanduser()
        if kind is not None and kind not in forms.kinds:
            raise LLMError(forms.unknown.format(spec=spec))
        if not path.is_dir():
            if kind is not None:
                raise LLMError(f"{forms.label} {spec!r}: {path} is not a directory")
            raise LLMError(forms.unknown.format(spec=spec))
        base, adapter = model_and_adapter_dirs(path, spec)
        return cls(kind or "hf", spec, path=base, adapter=adapter)


def _local_kind(spec: str) -> tuple[SpecKind | None, str]:
    """The kind a local spec's prefix names (None: no prefix, a bare directory) and the path after it."""
    for kind in ("vllm", "hf"):
        if spec.startswith(f"{kind}:"):
            return kind, spec.split(":", 1)[1]
    return None, spec


def model_and_adapter_dirs(path: Path, spec: str) -> tuple[Path, Path | None]:
    """(base model dir, adapter dir or None) of a local directory: a peft adapter directory loads on top
    of the base model its ``adapter_config.json`` names."""
    if not (path / "adapter_config.json").is_file():
        return path, None
    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (ValueError, AttributeError):
        raise LLMError(f"LLM spec {spec!r}: {path}/adapter_config.json is not a JSON object") from None
    if not base or not Path(base).is_dir():
        raise LLMError(f"LLM spec {spec!r}: adapter's base model {base!r} is not a local directory")
    return Path(base), path


def backend_from_spec(spec: str, *, max_concurrency: int | None = None) -> ChatBackend:
    """Build a chat back end from a one-string spec (``ModelSpec``, in its ``CHAT_SPECS`` forms).

    - ``http(s)://host:port/v1#model-name`` -> ``OpenAICompatBackend`` (API key from
      ``OPENAI_API_KEY`` if set; ``max_concurrency`` requests in flight, default 8);
    - ``hf:/path/to/dir`` or an existing directory -> ``TransformersBackend``; a peft adapter
      directory loads on top of the base model its ``adapter_config.json`` names.
    """
    parsed = ModelSpec.parse(spec, CHAT_SPECS)
    if parsed.kind == "http":
        assert parsed.url is not None and parsed.name is not None
        return OpenAICompatBackend(
            parsed.url,
            parsed.name,
            api_key=os.environ.get("OPENAI_API_KEY"),
            max_concurrency=max_concurrency or 8,
        )
    assert parsed.path is not None
    return TransformersBackend(parsed.path, adapter_dir=parsed.adapter)
