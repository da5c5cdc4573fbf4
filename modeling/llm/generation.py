"""Batched ``model.generate`` with each row's own sampling, budget and stop (``generate_ids``), and the
pieces every local decoding path shares: stop and pad ids, left padding, seeded per-row sampling."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from .chat import LLMError, Sampling


def stop_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The EOS ids of the model's generation config and of its tokenizer (raises LLMError if none)."""
    stop = model.generation_config.eos_token_id
    ids = set(stop if isinstance(stop, list) else [stop] if stop is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    if not ids:
        raise LLMError("neither its tokenizer nor its generation config has an EOS token")
    return ids


def pad_token_id(tokenizer: Any, stop_ids: set[int]) -> int:
    pad = tokenizer.pad_token_id
    return pad if pad is not None else min(stop_ids)


def context_length(model: Any) -> int | None:
    limit = getattr(model.config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) else None


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device: Any) -> tuple[Any, Any]:
    """(input_ids, attention_mask) of ``seqs`` left-padded to one width, on ``device``."""
    import torch

    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        input_ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
        attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def generate_ids(
    model: Any,
    prompts: Sequence[Sequence[int]],
    samplings: Sequence[Sampling],
    max_new_tokens: int,
    *,
    stop_ids: set[int],
    pad_id: int,
    streamer: Any = None,
    budgets: Sequence[int] | None = None,
    row_done: Callable[[int, list[int]], bool] | None = None,
) -> list[tuple[list[int], str]]:
    """One left-padded batch through ``model.generate``: each row's new token ids, cut before the first
    stop token, and its finish reason ("stop" or "length").

    Rows are greedy when their ``temperature`` is 0, otherwise sampled by ``_RowSampler`` (own
    temperature, top-p and seeded RNG per row). ``budgets`` gives each row its own number of new tokens
    (at most ``max_new_tokens``); ``row_done(row, new_ids)`` may end a row early (it wrote a stop
    string). A finished row leaves the batch (generate pads it), and generation ends when all have."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    budgets = list(budgets) if budgets is not None else [max_new_tokens] * len(prompts)
    if len(budgets) != len(prompts) or not all(1 <= b <= max_new_tokens for b in budgets):
        raise ValueError("budgets must give every row a number of new tokens from 1 to max_new_tokens")
    input_ids, attention_mask = left_pad(prompts, pad_id, model.device)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,  # sampling, when asked, happens in _RowSampler so each row has its own RNG
        eos_token_id=sorted(stop_ids),
        pad_token_id=pad_id,
    )
    processors = LogitsProcessorList()
    if any(s.temperature > 0 for s in samplings):
        processors.append(_RowSampler(samplings, model.device))
    criteria = StoppingCriteriaList()
    if row_done is not None or min(budgets) < max_new_tokens:
        criteria.append(_RowStop(input_ids.shape[1], budgets, stop_ids, row_done))
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=config,
            logits_processor=processors,
            stopping_criteria=criteria,
            streamer=streamer,
        )
    results = []
    for row in range(len(prompts)):
        # A row that ran out of budget was padded after it: cut at the budget before looking for a stop.
        new_ids = output[row, input_ids.shape[1] : input_ids.shape[1] + budgets[row]].tolist()
        results.append(_cut_at_stop(new_ids, stop_ids))
    return results


class _RowStop:
    """Stopping criterion that finishes each row on its own: at its budget, or when ``row_done`` says
    so (a stop string was written). A finished row is padded by generate from then on."""

    def __init__(
        self,
        width: int,
        budgets: Sequence[int],
        stop_ids: set[int],
        row_done: Callable[[int, list[int]], bool] | None,
    ) -> None:
        self.width = width
        self.budgets = budgets
        self.stop_ids = stop_ids
        self.row_done = row_done
        self.done = [False] * len(budgets)

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        n = input_ids.shape[1] - self.width
        for row, budget in enumerate(self.budgets):
            if self.done[row]:
                continue
            if n >= budget:
                self.done[row] = True
            elif self.row_done is not None:
                ids, finish = _cut_at_stop(input_ids[row, self.width :].tolist(), self.stop_ids)
                self.done[row] = finish == "stop" or self.row_done(row, ids)
        return torch.tensor(self.done, dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(ids: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    for j, token in enumerate(ids):
        if token in stop_ids:
            return ids[:j], "stop"
    return ids, "length"


def _cut_at_strings(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(x) for x in stops) if i >= 0), default=len(text))
    return text[:cut]


def row_generator(seed: int | None, device: Any) -> Any:
    """A ``torch.Generator`` seeded with ``seed`` (None: use the global torch RNG)."""
    import torch

    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def sample_token(scores: Any, temperature: float, top_p: float, generator: Any) -> Any:
    """Sample one token id (a 1-element tensor) from a row of logits at ``temperature`` (> 0) with
    nucleus ``top_p``."""
    import torch

    probs = torch.softmax(scores.float() / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token):
        # a token is dropped when the mass before it already reaches top_p.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        sorted_probs[drop] = 0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator)


class _RowSampler:
    """Logits processor that samples each row with its own temperature, top-p and RNG.

    It returns scores that are -inf everywhere except the sampled token, so generate's greedy
    step picks exactly that token; rows with temperature 0 pass through untouched (greedy).
    """

    def __init__(self, requests: Sequence[Sampling], device: Any) -> None:
        self.requests = requests
        self.generators = [row_generator(r.seed, device) for r in requests]

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        out = scores.clone()
        for row, request in enumerate(self.requests):
            if request.temperature <= 0:
                continue
            token = sample_token(scores[row], request.temperature, request.top_p, self.generators[row])
            out[row] = float("-inf")
            out[row, token] = 0.0
        return out
