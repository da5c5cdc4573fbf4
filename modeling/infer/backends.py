"""Back ends behind ``PersonalizationBackend`` (pick one with ``backend_from_spec``):

- ``LocalBackend``: a local Hugging Face directory (and a peft LoRA adapter, merged into the weights),
  through the local engine (``modeling.infer.decoding``);
- ``OpenAICompletionsBackend``: an OpenAI-compatible ``/v1/completions`` endpoint (vLLM's server, or
  ``fspo serve-model``) given the same prompt as text; an adapter is picked by its served name;
- ``VLLMBackend``: vLLM's offline engine with automatic prefix caching, one engine per base model in a
  process and each adapter a LoRA request on it (``modeling.infer.vllm_engine``; GPU hosts only).

Every back end encodes a prompt as training did (``modeling.llm.fspo_prompt_ids``): plain Markdown, or
wrapped in the model's chat template when the checkpoint's ``fspo.json`` says it was trained so
(``checkpoint_chat_template``). ``generate_for_episodes`` runs a back end on episodes
(``modeling.data.Episode``), grouped by user.
"""

from __future__ import annotations

import json
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import Episode, Pair
from ..llm import (
    DTYPES,
    LLMError,
    ModelSpec,
    OpenAICompatBackend,
    TextRequest,
    chat_wrapped,
    fspo_prompt_ids,
    model_and_adapter_dirs,
)
from .decoding import generate_for_users
from .generation import (
    Generation,
    GenerationStats,
    UserQuestions,
    _check_decoding,
    _regroup,
    finish_generation,
    question_seed,
)
from .vllm_engine import adapter_rank, engine_options, engine_requests, vllm_engine


@dataclass(frozen=True)
class Decoding:
    """The settings of one ``generate_many`` call, checked, as every back end's ``_generate`` gets them."""

    cot: bool
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None


class PersonalizationBackend(ABC):
    """Anything that writes responses personalized from users' few-shot picks, in question order.

    Back ends implement ``_generate`` (several users, batched across users, with the settings checked);
    ``generate_many`` checks the settings and calls it, ``generate`` (one user) is ``generate_many`` of
    one."""

    name: str

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
        """Each user's generations, in question order (see ``generate_personalized`` for the settings)."""
        _check_decoding(max_new_tokens, temperature, top_p, seed)
        return self._generate(users, Decoding(cot, max_new_tokens, temperature, top_p, seed))

    @abstractmethod
    def _generate(self, users: Sequence[UserQuestions], decoding: Decoding) -> list[list[Generation]]: ...

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
    is the one its ``adapter_config.json`` names. Both are checked before anything loads
    (``modeling.models.check_causal_lm_dir``; an adapter trained on another base is refused by
    ``check_adapter_base``), and a checkpoint written by ``fspo train`` has its prompt format checked
    and says whether its prompts are chat-wrapped (``checkpoint_chat_template``). The adapter is merged
    into the weights (``merge_adapter``): one backend serves one adapter, and merged it generates the
    same greedy replies 5-15% faster on SmolLM2 with less memory (``docs/benchmarks.md``). A
    bad directory or adapter is a one-line ``LLMError``. Thread-safe: one lock serialises generation.
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
        merge_adapter: bool = True,
    ) -> None:
        model_dir = Path(model_dir)
        if adapter is None and (model_dir / "adapter_config.json").is_file():
            model_dir, adapter = model_and_adapter_dirs(model_dir, str(model_dir))
        adapter = Path(adapter) if adapter is not None else None
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.chat_template = _check_dirs(model_dir, adapter)
        self.model, self.tokenizer = _load(model_dir, adapter, device, dtype, merge_adapter)
        self.name = f"hf:{model_dir}" + (f"+{adapter}" if adapter is not None else "")
        self.adapter_merged = adapter is not None and merge_adapter
        self.batch_size = batch_size
        self.reuse_prefix = reuse_prefix
        self.last_stats = GenerationStats()
        self._lock = threading.Lock()

    def _generate(self, users: Sequence[UserQuestions], decoding: Decoding) -> list[list[Generation]]:
        """See ``generate_for_users``; its stats are kept in ``last_stats``."""
        stats = GenerationStats()
        with self._lock:  # the model's buffers and the Rust tokenizer are not shared across threads
            generations = generate_for_users(
                self.model,
                self.tokenizer,
                users,
                cot=decoding.cot,
                chat_template=self.chat_template,
                max_new_tokens=decoding.max_new_tokens,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                seed=decoding.seed,
                reuse_prefix=self.reuse_prefix,
                batch_size=self.batch_size,
                stats=stats,
            )
            self.last_stats = stats
        return generations


def _check_dirs(model_dir: Path, adapter: Path | None) -> bool:
    """Check a base model directory (and adapter) before loading; whether prompts are chat-wrapped."""
    from ..models import ModelError, check_adapter_base, check_causal_lm_dir

    if not model_dir.is_dir():
        raise LLMError(f"cannot load model: {model_dir} is not a directory")
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        raise LLMError(f"cannot load adapter: {adapter} has no adapter_config.json")
    chat_template = checkpoint_chat_template(model_dir, adapter)
    try:
        check_causal_lm_dir(model_dir)
        if adapter is not None:
            check_adapter_base(adapter, model_dir)
    except ModelError as exc:
        raise LLMError(f"cannot load model: {exc}") from None
    return chat_template


def _load(model_dir: Path, adapter: Path | None, device: str, dtype: str, merge: bool) -> tuple[Any, Any]:
    """(model in eval mode on ``device``, tokenizer); the adapter merged into the weights if ``merge``.

    The tokenizer is the checkpoint's own (``fspo train`` saves it beside the adapter), else the base's."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = (
        adapter if adapter is not None and (adapter / "tokenizer_config.json").is_file() else model_dir
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype="auto" if dtype == "auto" else getattr(torch, dtype)
        )
    except (OSError, ValueError) as exc:
        raise LLMError(f"cannot load model from {model_dir}: {' '.join(str(exc).split())[:300]}") from None
    # The base, the PeftModel around it, or the merged base: each a torch module.
    ready: torch.nn.Module = model
    if adapter is not None:
        from peft import PeftModel

        try:
            peft_model = PeftModel.from_pretrained(model, adapter)
        except (OSError, ValueError, RuntimeError) as exc:
            raise LLMError(f"cannot load adapter {adapter}: {' '.join(str(exc).split())[:300]}") from None
        ready = peft_model.merge_and_unload() if merge else peft_model
    return ready.to(torch.device(device)).eval(), tokenizer


def checkpoint_chat_template(*dirs: Path | None) -> bool:
    """Whether a checkpoint's prompts are wrapped in the model's chat template: its ``fspo.json``
    ``config.chat_template`` (``TrainConfig.chat_template``), False when absent. The last of ``dirs``
    that has a manifest decides (pass the adapter after its base: the adapter's training is what the
    prompt must match); every manifest's prompt format is checked."""
    wrapped = False
    for d in dirs:
        if d is None:
            continue
        manifest = _manifest(d)
        if manifest is not None:
            config = manifest.get("config")
            wrapped = bool(config.get("chat_template", False)) if isinstance(config, dict) else False
    return wrapped


def _manifest(path: Path) -> dict[str, Any] | None:
    """A checkpoint's ``fspo.json`` with its prompt format checked; None for a plain HF directory."""
    from ..data import PROMPT_FORMAT_VERSION

    manifest = path / "fspo.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
        fmt = data.get("prompt_format_version")
    except (ValueError, AttributeError):
        raise LLMError(f"cannot load model: {manifest} is not a JSON object") from None
    if fmt != PROMPT_FORMAT_VERSION:
        raise LLMError(
            f"cannot load model: {path} uses prompt format {fmt!r}, this code writes {PROMPT_FORMAT_VERSION!r}"
        )
    return data


class OpenAICompletionsBackend(PersonalizationBackend):
    """An OpenAI-compatible ``/v1/completions`` endpoint given the FSPO prompt as text.

    ``model`` is the served name: the base model, or a LoRA adapter (vLLM's ``--lora-modules
    name=dir``, ``fspo serve-model --adapter name=dir``). One request per question, all sent
    concurrently with retries (``OpenAICompatBackend``). The text is the plain Markdown prompt, or with
    ``chat_template`` (a checkpoint trained with ``TrainConfig.chat_template``) that prompt wrapped in
    the chat template of ``tokenizer`` (``modeling.llm.chat_wrapped``; a local tokenizer or model
    directory, or a loaded tokenizer: the served model's).

    The server tokenizes. ``fspo serve-model`` does it exactly as ``fspo_prompt_ids``: the document BOS
    once (a chat-wrapped text already starts with any BOS its template writes). vLLM adds its
    tokenizer's own special tokens, which is the same for plain prompts on Llama 3 (its post-processor
    adds ``<|begin_of_text|>``), but doubles a BOS that a chat template writes itself (Llama 3, Gemma;
    not SmolLM2, whose template writes none). Prompts longer than the server's context are the server's
    to refuse (no shots are cut here: the context is not known). Prefix reuse is the server's business
    (vLLM's automatic prefix caching; ``cached_tokens`` is not reported here)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        chat_template: bool = False,
        tokenizer: str | Path | Any = None,
        **http_options: Any,
    ) -> None:
        if chat_template and tokenizer is None:
            raise ValueError("chat_template needs the served model's tokenizer (a directory or a tokenizer)")
        if isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            except (OSError, ValueError) as exc:
                raise LLMError(
                    f"cannot load tokenizer from {tokenizer}: {' '.join(str(exc).split())[:300]}"
                ) from None
        self.chat_template = chat_template
        self.tokenizer = tokenizer
        self.client = OpenAICompatBackend(base_url, model, api_key=api_key, **http_options)
        self.name = f"completions:{self.client.name}"

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> OpenAICompletionsBackend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def prompt_text(self, prompt: str) -> str:
        """The text sent for one FSPO prompt: as is, or wrapped in the chat template."""
        return chat_wrapped(self.tokenizer, prompt) if self.chat_template else prompt

    def _generate(self, users: Sequence[UserQuestions], decoding: Decoding) -> list[list[Generation]]:
        requests, descriptions = [], []
        for user in users:
            for prompt, q in zip(user.prompts(cot=decoding.cot), user.questions, strict=True):
                requests.append(
                    TextRequest(
                        self.prompt_text(prompt),
                        max_tokens=decoding.max_new_tokens,
                        temperature=decoding.temperature,
                        top_p=decoding.top_p,
                        seed=question_seed(decoding.seed, q),
                    )
                )
                descriptions.append(user.description)
        completions = self.client.complete_text(requests)
        flat = [
            finish_generation(
                c.text,
                cot=decoding.cot,
                description=d,
                prompt_tokens=c.prompt_tokens,
                new_tokens=c.completion_tokens,
                finish_reason=c.finish_reason,
            )
            for c, d in zip(completions, descriptions, strict=True)
        ]
        return _regroup(users, flat)


class VLLMBackend(PersonalizationBackend):
    """vLLM's offline engine on a base model, with or without one of its LoRA adapters.

    The engine is the process's one for that base (``vllm_engine``: made by the first back end that
    asks, shared by all after), so the arms of a study that share a base load it once; ``adapter``, a
    peft LoRA directory checked against the base as locally, goes with each call as its ``LoRARequest``,
    which vLLM applies unmerged in batched kernels. Automatic prefix caching is on: a user's few-shot
    prefix, which comes first in every FSPO prompt, is computed once across their questions. Prompts go
    in as token ids encoded exactly as locally (``fspo_prompt_ids``, chat-wrapped when the checkpoint
    says so), with the earliest shots cut from a prompt too long for the engine's ``max_model_len``
    (``engine_requests``). Generation stops at the model's EOS tokens (vLLM reads them from its generation
    config and tokenizer). ``engine_kwargs`` go to ``vllm.LLM`` over ``ENGINE_DEFAULTS``."""

    def __init__(
        self, model_dir: str | Path, *, adapter: str | Path | None = None, **engine_kwargs: Any
    ) -> None:
        model_dir = Path(model_dir)
        adapter = Path(adapter) if adapter is not None else None
        self.chat_template = _check_dirs(model_dir, adapter)
        options = engine_options(**engine_kwargs)
        if adapter is not None:
            if not options["enable_lora"]:
                raise ValueError("an adapter needs enable_lora")
            if (rank := adapter_rank(adapter)) > options["max_lora_rank"]:
                raise LLMError(
                    f"cannot load adapter {adapter}: its rank {rank} is above the engine's max_lora_rank "
                    f"{options['max_lora_rank']} (pass max_lora_rank={rank} or more)"
                )
        self.engine = vllm_engine(model_dir, **options)
        self.adapter = adapter
        self.tokenizer = self.engine.llm.get_tokenizer()
        self.name = f"vllm:{model_dir}" + (f"+{adapter}" if adapter is not None else "")

    def _generate(self, users: Sequence[UserQuestions], decoding: Decoding) -> list[list[Generation]]:
        from vllm import SamplingParams

        limit = getattr(getattr(self.engine.llm.llm_engine, "model_config", None), "max_model_len", None)
        requests, fitted = engine_requests(
            users,
            lambda text: fspo_prompt_ids(self.tokenizer, text, chat_template=self.chat_template),
            max_model_len=limit if isinstance(limit, int) else None,
            cot=decoding.cot,
            max_new_tokens=decoding.max_new_tokens,
            temperature=decoding.temperature,
            top_p=decoding.top_p,
            seed=decoding.seed,
        )
        inputs = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
        params = [
            SamplingParams(
                n=1, temperature=r.temperature, top_p=r.top_p, max_tokens=r.max_tokens, seed=r.seed
            )
            for r in requests
        ]
        with self.engine.lock:
            lora = self.engine.lora_request(self.adapter)
            outputs = self.engine.llm.generate(inputs, params, lora_request=lora, use_tqdm=False)
        flat = []
        for r, out in zip(requests, outputs, strict=True):
            choice = out.outputs[0]
            flat.append(
                finish_generation(
                    choice.text,
                    cot=decoding.cot,
                    description=r.description,
                    prompt_tokens=len(r.prompt_token_ids),
                    new_tokens=len(choice.token_ids),
                    cached_tokens=int(getattr(out, "num_cached_tokens", 0) or 0),
                    finish_reason=choice.finish_reason or "stop",
                    shots_cut=r.shots_cut,
                )
            )
        return fitted.restore(flat, users)


def backend_from_spec(spec: str | ModelSpec, **options: Any) -> PersonalizationBackend:
    """A personalization back end from a one-string spec, or one parsed by ``ModelSpec.parse``
    (``options`` go to its constructor):

    - ``http(s)://host:port/v1#model`` -> ``OpenAICompletionsBackend`` (API key from
      ``OPENAI_API_KEY`` if set);
    - ``vllm:/path/to/dir`` -> ``VLLMBackend``;
    - ``hf:/path/to/dir`` or an existing directory -> ``LocalBackend``.

    A directory holding a peft adapter loads on top of the base model its ``adapter_config.json``
    names."""
    parsed = spec if isinstance(spec, ModelSpec) else ModelSpec.parse(spec)
    if parsed.kind == "http":
        assert parsed.url is not None and parsed.name is not None
        return OpenAICompletionsBackend(
            parsed.url, parsed.name, api_key=os.environ.get("OPENAI_API_KEY"), **options
        )
    assert parsed.path is not None
    if parsed.kind == "vllm":
        return VLLMBackend(parsed.path, adapter=parsed.adapter, **options)
    return LocalBackend(parsed.path, adapter=parsed.adapter, **options)
