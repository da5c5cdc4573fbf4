"""One interface for chat LLMs used by the data engine (persona writing, labeling, judging, ...).

Two back ends share the ``ChatBackend`` protocol (``chat``):

- ``OpenAICompatBackend`` (``openai_compat``) talks to any OpenAI-compatible server (vLLM's, a hosted
  one, or our own ``fspo serve-model``) with concurrent, retried HTTP requests;
- ``TransformersBackend`` (``transformers_backend``) runs a local Hugging Face causal-LM directory
  (optionally with LoRA adapters) with batched ``generate``; it is also the engine behind
  ``fspo serve-model``.

Both also complete plain-text prompts (``TextRequest``, OpenAI's ``/completions``: no chat template),
which is how FSPO's Markdown prompts are served (see ``modeling.infer``). ``encoding`` turns an FSPO
prompt into token ids as training does; ``generation`` holds the batched-generate pieces the local
decoders share.

``ModelSpec`` parses the one-string specs of configs and the CLI (``spec``); ``backend_from_spec`` turns
one into a chat back end.
"""

from .chat import (
    MAX_TOP_LOGPROBS,
    ChatBackend,
    ChatRequest,
    ChoiceBackend,
    ChoiceReply,
    Completion,
    LLMError,
    ProgressFn,
    Sampling,
    TextRequest,
    TokenLogprob,
    ask_choices,
    normalized_probs,
)
from .encoding import chat_wrapped, document_bos_id, fspo_prompt_ids, plain_prompt_ids
from .generation import (
    context_length,
    generate_ids,
    left_pad,
    pad_token_id,
    row_generator,
    sample_token,
    stop_token_ids,
)
from .openai_compat import OpenAICompatBackend
from .spec import (
    CHAT_SPECS,
    GENERATION_SPECS,
    ModelSpec,
    SpecForms,
    backend_from_spec,
    model_and_adapter_dirs,
)
from .transformers_backend import DTYPES, TransformersBackend

__all__ = [
    "CHAT_SPECS",
    "DTYPES",
    "GENERATION_SPECS",
    "MAX_TOP_LOGPROBS",
    "ChatBackend",
    "ChatRequest",
    "ChoiceBackend",
    "ChoiceReply",
    "Completion",
    "LLMError",
    "ModelSpec",
    "OpenAICompatBackend",
    "ProgressFn",
    "Sampling",
    "SpecForms",
    "TextRequest",
    "TokenLogprob",
    "TransformersBackend",
    "ask_choices",
    "backend_from_spec",
    "chat_wrapped",
    "context_length",
    "document_bos_id",
    "fspo_prompt_ids",
    "generate_ids",
    "left_pad",
    "model_and_adapter_dirs",
    "normalized_probs",
    "pad_token_id",
    "plain_prompt_ids",
    "row_generator",
    "sample_token",
    "stop_token_ids",
]
