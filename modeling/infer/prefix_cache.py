"""The local engine's shared-prefix KV cache and its decode loop.

A user's prompts share their leading token ids (``_shared_prefix_length``); that prefix runs through the
model once (``_prefill_prefix``); its KV cache is copied into every row of a batch of questions (in
buffers sized for the whole generation, ``_preallocated_layer_class``, so decoding never re-copies the
cache), only each question's suffix (question, headers) is run on top of it, and a batched decode loop
(``_Decoder``) writes the replies. Models whose KV cache is not plain full attention (sliding-window
layers: Gemma 2/3, Mistral with ``sliding_window``) always take the plain path
(``_prefix_cache_problem`` says why).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from ..llm import pad_token_id, row_generator, sample_token, stop_token_ids


def _shared_prefix_length(prompts: list[list[int]]) -> int:
    """How many leading token ids all ``prompts`` share, leaving every prompt at least one of its own.

    The cut is on token ids, not text, so reusing the prefix's KV cache is exact by causality whatever
    the tokenizer does at the boundary: with a BPE tokenizer the prompts share every token up to
    ``## Question\\n`` (and any words all their questions start with); a SentencePiece one that merges
    across the newline shares a token or two fewer. Each row keeps at least one token, the position
    that predicts its first new token; the chat template's closing turn markers simply join each
    question's suffix."""
    first = prompts[0]
    n = min(len(p) for p in prompts) - 1
    for other in prompts[1:]:
        i = 0
        while i < n and other[i] == first[i]:
            i += 1
        n = i
    return max(n, 0)


def _prefix_cache_problem(model: Any) -> str | None:
    """Why a prefix's KV cache cannot be copied under other suffixes for this model, or None.

    The reuse path expands plain full-attention KV layers into preallocated buffers. A sliding-window
    layer (Gemma 2/3, Mistral with ``sliding_window``) keeps only its last window of keys and masks by
    it, linear-attention or hybrid layers keep a state instead of keys: those models take the plain
    path, which is what ``generate`` does for them."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    try:
        kinds = {type(layer).__name__ for layer in DynamicCache(config=model.config).layers}
    except (TypeError, ValueError, AttributeError) as exc:  # a config the cache classes do not know
        return f"its KV cache cannot be built from its config ({type(exc).__name__}), so a shared prefix is not reused"
    if kinds <= {DynamicLayer.__name__}:
        return None
    window = getattr(model.config.get_text_config(), "sliding_window", None)
    what = f"sliding-window attention (window {window})" if window else "not plain full attention"
    return f"its KV cache layers ({', '.join(sorted(kinds))}) are {what}, so a shared prefix is not reused"


def _prefill_prefix(model: Any, prefix_ids: list[int]) -> list[tuple[Any, Any]]:
    """Run the shared prefix once (batch of 1); its per-layer (keys, values)."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    input_ids = torch.tensor([prefix_ids], dtype=torch.long, device=model.device)
    # Only the cache is wanted; logits_to_keep=1 avoids a (prefix x vocab) logits tensor.
    model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    # An attention model's DynamicCache holds key/value layers; the stub's union also names the
    # linear-attention layers of hybrid models, which have no keys.
    return [(layer.keys, layer.values) for layer in cache.layers]  # type: ignore[union-attr]


@functools.cache
def _preallocated_layer_class() -> type:
    """Defined on first use, so importing this module does not import transformers."""
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A full-attention KV layer in a buffer allocated once for the whole generation.

        It behaves as ``DynamicLayer`` (keys/values are the first ``length`` positions), but an update
        writes in place instead of concatenating: ``DynamicLayer`` copies the whole cache at every
        decoding step, which on a 2k-token prefix costs more than the step's compute."""

        is_croppable = False

        def __init__(self, keys: Any, values: Any, batch: int, capacity: int) -> None:
            super().__init__()
            _, heads, length, _ = keys.shape
            self._k = keys.new_empty((batch, heads, capacity, keys.shape[-1]))
            self._v = values.new_empty((batch, values.shape[1], capacity, values.shape[-1]))
            self._k[:, :, :length] = keys  # broadcasts the batch-of-1 prefix to every row
            self._v[:, :, :length] = values
            self.length = length
            self.dtype, self.device = keys.dtype, keys.device
            self.is_initialized = True
            self._refresh()

        def _refresh(self) -> None:
            self.keys = self._k[:, :, : self.length]
            self.values = self._v[:, :, : self.length]

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            n, m = self.length, key_states.shape[-2]
            self._k[:, :, n : n + m] = key_states
            self._v[:, :, n : n + m] = value_states
            self.length = n + m
            self._refresh()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Any) -> None:
            self._k, self._v = self._k[indices], self._v[indices]
            self._refresh()

    return PreallocatedLayer


@dataclass(frozen=True)
class _Sampling:
    temperature: float
    top_p: float
    seed: int | None


class _Decoder:
    """The decode loop on top of a shared prefix cache."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.stop_ids = stop_token_ids(model, tokenizer)
        self.pad_id = pad_token_id(tokenizer, self.stop_ids)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def decode_on_prefix(
        self,
        prefix_kv: list[tuple[Any, Any]],
        prefix_len: int,
        suffixes: list[list[int]],
        samplings: list[_Sampling],
        max_new_tokens: int,
    ) -> list[tuple[list[int], str]]:
        """Each suffix's new token ids (cut before the stop token) and finish reason.

        Layout of row r after the suffix step (P = prefix length, L = longest suffix), in a KV buffer
        allocated once for P + L + max_new_tokens positions:
            cache:     [ prefix (P) | suffix_r, right-padded to L | new tokens ... ]
            positions:   0 .. P-1     P .. P+len_r-1, pads masked   P+len_r, P+len_r+1, ...
        Right padding keeps every row's real tokens at contiguous positions (RoPE sees exactly the
        positions of the unpadded prompt); the pads sit inside the cache but the attention mask hides
        them from every later query. Causal masking follows the cache index, which is the same for all
        rows, so only the per-row position ids and the mask differ between rows."""
        logits, cache, attention_mask, next_pos = self._run_suffixes(
            prefix_kv, prefix_len, suffixes, max_new_tokens
        )
        return self._decode_loop(logits, cache, attention_mask, next_pos, samplings, max_new_tokens)

    def _run_suffixes(
        self,
        prefix_kv: list[tuple[Any, Any]],
        prefix_len: int,
        suffixes: list[list[int]],
        max_new_tokens: int,
    ) -> tuple[Any, Any, Any, Any]:
        """The suffix step: every row's suffix, right-padded, run on its copy of the prefix cache.

        Returns (each row's logits for its first new token, the cache, the attention mask, each row's
        position of its next token)."""
        import torch
        from transformers.cache_utils import Cache

        model, device = self.model, self.model.device
        b = len(suffixes)
        lengths = torch.tensor([len(s) for s in suffixes], device=device)
        width = int(lengths.max())
        input_ids = torch.full((b, width), self.pad_id, dtype=torch.long, device=device)
        suffix_mask = torch.zeros((b, width), dtype=torch.long, device=device)
        for row, ids in enumerate(suffixes):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long, device=device)
            suffix_mask[row, : len(ids)] = 1
        # Each row gets a copy of the prefix cache in a buffer sized for the whole generation; the
        # prefix tensors themselves are never written to and serve every batch.
        capacity = prefix_len + width + max_new_tokens
        layer = _preallocated_layer_class()
        cache = Cache(layers=[layer(k, v, b, capacity) for k, v in prefix_kv])
        attention_mask = torch.cat(
            [torch.ones((b, prefix_len), dtype=torch.long, device=device), suffix_mask], 1
        )
        positions = torch.arange(prefix_len, prefix_len + width, device=device).expand(b, -1)
        # Only each row's last real suffix position predicts its first new token.
        last = lengths - 1
        keep, where = torch.unique(last, return_inverse=True)
        logits = model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
        logits = logits[torch.arange(b, device=device), where]  # (b, vocab)
        return logits, cache, attention_mask, prefix_len + lengths

    def _decode_loop(
        self,
        logits: Any,
        cache: Any,
        attention_mask: Any,
        next_pos: Any,
        samplings: list[_Sampling],
        max_new_tokens: int,
    ) -> list[tuple[list[int], str]]:
        """Pick a token for every live row, drop the rows that stopped, run one step; until every row
        stopped or has ``max_new_tokens`` tokens. Each row's new ids and finish reason."""
        import torch

        model, device = self.model, self.model.device
        b = len(samplings)
        generators = [row_generator(s.seed, device) for s in samplings]
        new_ids: list[list[int]] = [[] for _ in range(b)]
        finish = ["length"] * b
        active = list(range(b))  # batch row of each live row
        for step in range(max_new_tokens):
            tokens = self._pick(logits, [samplings[r] for r in active], [generators[r] for r in active])
            live = []
            for j, row in enumerate(active):
                token = int(tokens[j])
                if token in self.stop_ids:
                    finish[row] = "stop"
                else:
                    new_ids[row].append(token)
                    live.append(j)
            if not live or step == max_new_tokens - 1:
                break
            if len(live) < len(active):  # drop finished rows from the batch (and the cache)
                keep_rows = torch.tensor(live, device=device)
                cache.batch_select_indices(keep_rows)
                attention_mask, next_pos, tokens = (
                    attention_mask[keep_rows],
                    next_pos[keep_rows],
                    tokens[keep_rows],
                )
                active = [active[j] for j in live]
            attention_mask = torch.cat(
                [attention_mask, torch.ones((len(active), 1), dtype=torch.long, device=device)], 1
            )
            logits = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=next_pos[:, None],
                cache=cache,
                use_cache=True,
            ).logits[:, -1]
            next_pos = next_pos + 1
        return [(ids, reason) for ids, reason in zip(new_ids, finish, strict=True)]

    def _pick(self, logits: Any, samplings: list[_Sampling], generators: list[Any]) -> Any:

        # Float32 like generate()'s scores, so greedy ties break the same way in both paths.
        logits = logits.float()
        picks = logits.argmax(-1)
        for j, (s, g) in enumerate(zip(samplings, generators, strict=True)):
            if s.temperature > 0:
                picks[j] = sample_token(logits[j], s.temperature, s.top_p, g)[0]
        return picks
