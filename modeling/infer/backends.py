"""Back ends behind ``PersonalizationBackend`` (pick one with ``backend_from_spec``):

- ``LocalBackend``: a local Hugging Face directory (and a peft LoRA adapter), through the local engine
  (``modeling.infer.decoding``);
- ``OpenAICompletionsBackend``: an OpenAI-compatible ``/v1/completions`` endpoint (vLLM's server, or
  ``fspo serve-model``) given the same plain-text prompt; an adapter is picked by its served name;
- ``VLLMBackend``: vLLM's offline engine with automatic prefix caching (GPU hosts only).

``generate_for_episodes`` runs a back end on episodes (``modeling.data.Episode``), grouped by user.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..data import Episode, Pair
from ..llm import (
    LLMError,
    OpenAICompatBackend,
    TextRequest,
    TransformersBackend,
    model_and_adapter_dirs,
    plain_prompt_ids,
)
from .decoding import (
    Generation,
    GenerationStats,
    UserQuestions,
    _check_decoding,
    _regroup,
    finish_generation,
    generate_for_users,
    question_seed,
)


class PersonalizationBackend(ABC):
    """Anything that writes responses personalized from users' few-shot picks, in question order.

    Back ends implement ``generate_many`` (several users, batched across users); ``generate`` (one
    user) is ``generate_many`` of one."""

    name: str

    @abstractmethod
    def generate_many(
        self,
        users: Sequence[UserQuestions],
        *,
        cot: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]: ...

    def generate(
        self,
        shots: Sequence[Pair],
        questions: Sequence[str],
        *,
        instruction: str,
        cot: bool = False,
        description: str | None = None,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[Generation]:
        """One user's generations (see ``generate_personalized`` for the arguments)."""
        user = UserQuestions(tuple(shots), tuple(questions), instruction, description)
        return self.generate_many(
            [user], cot=cot, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed
        )[0]


# A CoT generation writes the user description before the response; this many more new tokens leave
# the response the whole ``max_new_tokens`` (an ELIX persona description is about 40-60 tokens).
COT_DESCRIPTION_TOKENS = 128


def generate_for_episodes(
    backend: PersonalizationBackend,
    episodes: Sequence[Episode],
    *,
    cot: bool = False,
    oracle_description: bool = False,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int | None = None,
) -> list[Generation]:
    """One generation per episode (its target question, given its shots), in input order.

    Episodes of the same user (same instruction and shots) form one ``UserQuestions``, so their shared
    prefix is computed once, and all users go to the back end in one call. ``oracle_description`` puts
    each episode's true description in the prompt (the oracle-persona baseline). ``max_new_tokens`` is
    the response's budget: with ``cot`` the back end gets ``COT_DESCRIPTION_TOKENS`` more."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, ep in enumerate(episodes):
        desc = ep.description if oracle_description else None
        if oracle_description and not desc:
            raise ValueError(f"episodes[{i}] has no description for the oracle-persona prompt")
        groups.setdefault((ep.instruction, tuple(ep.shots), desc), []).append(i)
    if not groups:
        return []
    users = [
        UserQuestions(shots, tuple(episodes[i].question for i in idx), instruction, desc)
        for (instruction, shots, desc), idx in groups.items()
    ]
    per_user = backend.generate_many(
        users,
        cot=cot,
        max_new_tokens=max_new_tokens + (COT_DESCRIPTION_TOKENS if cot else 0),
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    out: list[Generation | None] = [None] * len(episodes)
    for idx, gens in zip(groups.values(), per_user, strict=True):
        for i, g in zip(idx, gens, strict=True):
            out[i] = g
    return [g for g in out if g is not None]


class LocalBackend(PersonalizationBackend):
    """A local Hugging Face causal-LM directory (optionally with a peft LoRA adapter directory), loaded
    once, generating through ``generate_for_users``.

    ``model_dir`` may itself be an adapter directory (as ``fspo train --lora`` writes): its base model
    is the one its ``adapter_config.json`` names. Loading is ``TransformersBackend``'s (so a bad
    directory or adapter is a one-line ``LLMError``, and the adapter runs unmerged exactly as ``fspo
    serve-model`` runs it). A checkpoint written by ``fspo train`` has its prompt-format version checked.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int = 8,
        reuse_prefix: bool = True,
    ) -> None:
        for d in (model_dir, adapter):
            if d is not None:
                _check_prompt_format(Path(d))
        if adapter is None and Path(model_dir).is_dir():
            model_dir, adapter = model_and_adapter_dirs(Path(model_dir), str(model_dir))
        self.engine = TransformersBackend(model_dir, adapter_dir=adapter, device=device, dtype=dtype)
        self.name = self.engine.name
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.last_stats = GenerationStats()

    def generate_many(
        self,
        users: Sequence[UserQuestions],
        *,
        cot: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        """See ``generate_for_users``; its stats are kept in ``last_stats``."""
        stats = GenerationStats()
        with self.engine.use_adapter(self.engine.default_adapter):  # also holds the model's lock
            generations = generate_for_users(
                self.engine.model,
                self.engine.tokenizer,
                users,
                cot=cot,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                reuse_prefix=self.reuse_prefix,
                batch_size=self.batch_size,
                stats=stats,
            )
        self.last_stats = stats
        return generations


def _check_prompt_format(path: Path) -> None:
    from ..data import PROMPT_FORMAT_VERSION

    manifest = path / "fspo.json"
    if not manifest.is_file():
        return  # a plain HF directory (a base model): nothing to check
    import json

    try:
        fmt = json.loads(manifest.read_text()).get("prompt_format_version")
    except (ValueError, AttributeError):
        raise LLMError(f"cannot load model: {manifest} is not a JSON object") from None
    if fmt != PROMPT_FORMAT_VERSION:
        raise LLMError(
            f"cannot load model: {path} uses prompt format {fmt!r}, this code writes {PROMPT_FORMAT_VERSION!r}"
        )


class OpenAICompletionsBackend(PersonalizationBackend):
    """An OpenAI-compatible ``/v1/completions`` endpoint given the FSPO prompt as plain text.

    ``model`` is the served name: the base model, or a LoRA adapter (vLLM's ``--lora-modules
    name=dir``, ``fspo serve-model --adapter name=dir``). One request per question, all sent
    concurrently with retries (``OpenAICompatBackend``). The server tokenizes and adds the BOS:
    ``fspo serve-model`` exactly as ``plain_prompt_ids``; vLLM through its tokenizer's own special
    tokens, which is the same for Llama 3 (its post-processor adds ``<|begin_of_text|>``) but not for a
    tokenizer that declares a BOS without adding it. Prefix reuse is the server's business (vLLM's
    automatic prefix caching; ``cached_tokens`` is not reported here)."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, **http_options: Any) -> None:
        self.client = OpenAICompatBackend(base_url, model, api_key=api_key, **http_options)
        self.name = f"completions:{self.client.name}"

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OpenAICompletionsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate_many(
        self,
        users: Sequence[UserQuestions],
        *,
        cot: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        _check_decoding(max_new_tokens, temperature, top_p, seed)
        requests, descriptions = [], []
        for user in users:
            for prompt, q in zip(user.prompts(cot=cot), user.questions, strict=True):
                requests.append(
                    TextRequest(
                        prompt,
                        max_tokens=max_new_tokens,
                        temperature=temperature,
                        top_p=top_p,
                        seed=question_seed(seed, q),
                    )
                )
                descriptions.append(user.description)
        completions = self.client.complete_text(requests)
        flat = [
            finish_generation(
                c.text,
                cot=cot,
                description=d,
                prompt_tokens=c.prompt_tokens,
                new_tokens=c.completion_tokens,
                finish_reason=c.finish_reason,
            )
            for c, d in zip(completions, descriptions, strict=True)
        ]
        return _regroup(users, flat)


VLLM_MISSING = "vLLM is not installed: pip install 'fspo-studies[vllm]' on a GPU host"


class VLLMBackend(PersonalizationBackend):
    """vLLM's offline engine (``vllm.LLM``) with automatic prefix caching, so a user's shared few-shot
    prefix is computed once across their questions. Prompts go in as token ids encoded exactly as
    locally (BOS once); ``adapter`` is a peft LoRA directory served through ``LoRARequest``."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        adapter: str | Path | None = None,
        enable_lora: bool = False,
        **engine_kwargs: Any,
    ) -> None:
        try:
            import vllm
        except ImportError:
            raise LLMError(VLLM_MISSING) from None
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise LLMError(f"cannot load model: {model_dir} is not a directory")
        _check_prompt_format(model_dir)
        self._lora = None
        if adapter is not None:
            adapter = Path(adapter)
            if not (adapter / "adapter_config.json").is_file():
                raise LLMError(f"cannot load adapter: {adapter} has no adapter_config.json")
            _check_prompt_format(adapter)
            from vllm.lora.request import LoRARequest

            enable_lora = True
            self._lora = LoRARequest(adapter.name, 1, str(adapter))
        engine_kwargs.setdefault("enable_prefix_caching", True)
        self.llm = vllm.LLM(model=str(model_dir), enable_lora=enable_lora, **engine_kwargs)
        self.tokenizer = self.llm.get_tokenizer()
        self.name = f"vllm:{model_dir}" + (f"+{adapter}" if adapter is not None else "")

    def generate_many(
        self,
        users: Sequence[UserQuestions],
        *,
        cot: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
    ) -> list[list[Generation]]:
        from vllm import SamplingParams

        _check_decoding(max_new_tokens, temperature, top_p, seed)
        inputs, params, descriptions = [], [], []
        for user in users:
            for prompt, q in zip(user.prompts(cot=cot), user.questions, strict=True):
                inputs.append({"prompt_token_ids": plain_prompt_ids(self.tokenizer, prompt)})
                params.append(
                    SamplingParams(
                        n=1,
                        temperature=temperature,
                        top_p=top_p,
                        max_tokens=max_new_tokens,
                        seed=question_seed(seed, q),
                    )
                )
                descriptions.append(user.description)
        outputs = self.llm.generate(inputs, params, lora_request=self._lora, use_tqdm=False)
        flat = []
        for item, out, d in zip(inputs, outputs, descriptions, strict=True):
            choice = out.outputs[0]
            flat.append(
                finish_generation(
                    choice.text,
                    cot=cot,
                    description=d,
                    prompt_tokens=len(item["prompt_token_ids"]),
                    new_tokens=len(choice.token_ids),
                    cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
                    finish_reason=choice.finish_reason or "stop",
                )
            )
        return _regroup(users, flat)


def backend_from_spec(spec: str, **options: Any) -> PersonalizationBackend:
    """A personalization back end from a one-string spec (``options`` go to its constructor):

    - ``http(s)://host:port/v1#model`` -> ``OpenAICompletionsBackend`` (API key from
      ``OPENAI_API_KEY`` if set);
    - ``vllm:/path/to/dir`` -> ``VLLMBackend``;
    - ``hf:/path/to/dir`` or an existing directory -> ``LocalBackend``.

    A directory holding a peft adapter loads on top of the base model its ``adapter_config.json``
    names."""
    if spec.startswith(("http://", "https://")):
        url, _, model = spec.partition("#")
        if not model:
            raise LLMError(
                f"spec {spec!r} needs the model name after '#', e.g. http://127.0.0.1:8000/v1#my-model"
            )
        return OpenAICompletionsBackend(url, model, api_key=os.environ.get("OPENAI_API_KEY"), **options)
    kind = "vllm" if spec.startswith("vllm:") else "hf"
    raw = spec.split(":", 1)[1] if spec.startswith(("vllm:", "hf:")) else spec
    path = Path(raw).expanduser()
    if not path.is_dir():
        if spec.startswith(("vllm:", "hf:")):
            raise LLMError(f"spec {spec!r}: {path} is not a directory")
        raise LLMError(
            f"unknown generation spec {spec!r}: expected 'http(s)://host:port/v1#model', 'vllm:/dir' or 'hf:/dir'"
        )
    base, adapter = model_and_adapter_dirs(path, spec)
    if kind == "vllm":
        return VLLMBackend(base, adapter=adapter, **options)
    return LocalBackend(base, adapter=adapter, **options)
