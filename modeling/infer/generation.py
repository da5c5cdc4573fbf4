"""The types every back end shares, and their common post-processing.

``UserQuestions`` is one user's few-shot picks and the questions to answer for them, rendered as FSPO
prompts; ``Generation`` is one response; ``finish_generation`` and ``question_seed`` make every back end
(``modeling.infer.backends``) post-process and seed the same way, so their outputs compare exactly.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..data import Pair, build_cot_prompt, build_prompt, split_cot_output
from ..llm import TextRequest


@dataclass(frozen=True)
class Generation:
    """One personalized response.

    text: the response (stripped).
    description: the user description that preceded the response: the model's own with CoT, the given
        one with ``description``, otherwise None.
    prompt_tokens: length of the full prompt in tokens (BOS included).
    new_tokens: tokens generated (the stop token included, as OpenAI counts).
    cached_tokens: prompt tokens that came from the shared-prefix cache instead of being run again.
    finish_reason: "stop" (EOS) or "length" (``max_new_tokens`` reached).
    shots_cut: the earliest shots dropped so that the prompt and ``max_new_tokens`` fit the model's
        context (0: the prompt holds every shot).
    """

    text: str
    description: str | None
    prompt_tokens: int
    new_tokens: int
    cached_tokens: int = 0
    finish_reason: str = "stop"
    shots_cut: int = 0


@dataclass
class GenerationStats:
    """What one local generation call computed (pass one in to have it filled).

    prompt_tokens: total length of all prompts (what a run without prefix reuse has to process).
    prompt_tokens_computed: prompt positions actually run through the model, padding included.
    prefix_tokens: length of the shared prefixes that were reused (each run once).
    reused: questions generated on top of a prefix cache.
    fallbacks: questions that shared a prefix with others of their user but went through plain
        ``generate`` because the model's KV cache cannot be reused that way (sliding-window layers).
    new_tokens: tokens generated over all questions.
    shots_cut: shots dropped from the start of prompts too long for the context, over all questions.
    prompts_cut: questions whose prompt lost at least one shot that way.
    """

    questions: int = 0
    prompt_tokens: int = 0
    prompt_tokens_computed: int = 0
    prefix_tokens: int = 0
    reused: int = 0
    fallbacks: int = 0
    new_tokens: int = 0
    shots_cut: int = 0
    prompts_cut: int = 0


@dataclass(frozen=True)
class UserQuestions:
    """One user's few-shot picks and the questions to answer for them.

    ``description`` (the oracle persona, or a teacher-forced one) goes into the prompt before the
    response header; without it, a CoT run lets the model write the description first."""

    shots: tuple[Pair, ...]
    questions: tuple[str, ...]
    instruction: str
    description: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shots", tuple(self.shots))
        if isinstance(self.questions, str) or not self.questions:
            raise ValueError("questions must be a non-empty list of strings")
        object.__setattr__(self, "questions", tuple(self.questions))
        for i, q in enumerate(self.questions):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"questions[{i}] must be a non-empty string")

    def prompts(self, *, cot: bool = False) -> list[str]:
        """The FSPO prompt of each question, exactly as training renders it (``modeling.data``)."""
        if self.description is not None:
            return [
                build_prompt(self.shots, q, instruction=self.instruction, description=self.description)
                for q in self.questions
            ]
        if cot:
            return [build_cot_prompt(self.shots, q, instruction=self.instruction) for q in self.questions]
        return [build_prompt(self.shots, q, instruction=self.instruction) for q in self.questions]


def finish_generation(
    text: str,
    *,
    cot: bool,
    description: str | None,
    prompt_tokens: int,
    new_tokens: int,
    cached_tokens: int = 0,
    finish_reason: str = "stop",
    shots_cut: int = 0,
) -> Generation:
    """A Generation from a model's raw continuation of a ``UserQuestions`` prompt: every back end
    post-processes the same way, so their texts compare exactly."""
    if description is not None:
        predicted, response = description.strip(), text.strip()
    elif cot:
        predicted, response = split_cot_output(text)
    else:
        predicted, response = None, text.strip()
    return Generation(response, predicted, prompt_tokens, new_tokens, cached_tokens, finish_reason, shots_cut)


def question_seed(seed: int | None, question: str) -> int | None:
    """The sampling seed of one question: derived from ``seed`` and the question's text, so a seeded
    reply is the same whatever else is asked with it (or in which order), while different questions
    draw from different random streams. Every back end uses it."""
    if seed is None:
        return None
    digest = hashlib.sha256(f"{seed}\x00{question.strip()}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF  # 31 bits: a valid seed for any server


def _check_decoding(max_new_tokens: int, temperature: float, top_p: float, seed: int | None) -> None:
    # TextRequest validates exactly these fields the way the HTTP and chat paths do.
    TextRequest("", max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)


def _regroup(users: Sequence[UserQuestions], flat: list[Generation]) -> list[list[Generation]]:
    out, start = [], 0
    for user in users:
        out.append(flat[start : start + len(user.questions)])
        start += len(user.questions)
    return out
