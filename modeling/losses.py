"""Preference losses and the log-probabilities they consume, as pure tensor functions.

Everything here follows the FSPO paper (arXiv 2502.19312) and its ancestor, the DPO reference code:

- :func:`sequence_logps` turns a causal LM's logits into one log-probability per sequence;
- :func:`ipo_loss` (stage 2 of FSPO), :func:`dpo_loss` and :func:`sft_loss` (Pref-FT, stage 1) turn
  those into losses;
- :func:`packed_pair_logps` is the efficient way to score a preference pair: the long few-shot prompt
  runs through the model once per pair instead of twice; :func:`separate_pair_logps` is the plain way
  and serves as its reference.

Conventions: ``B`` is the batch (pairs or sequences), ``T`` the sequence length, ``V`` the vocabulary.
Log-probabilities are natural logs. Whether a sequence's log-probability is summed over its tokens (FSPO
and its reference code) or averaged (TRL's IPO) is chosen by the caller through ``average``; the losses
themselves take whatever per-sequence numbers they are given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F

__all__ = [
    "dpo_loss",
    "ipo_loss",
    "packed_group_logps",
    "packed_pair_logps",
    "response_logits",
    "separate_pair_logps",
    "sequence_logps",
    "sft_loss",
]

# Attention implementations that honour a custom 4D mask in transformers (checked against 5.23):
# `create_causal_mask` returns any 4D mask untouched; "sdpa" hands it to
# torch.nn.functional.scaled_dot_product_attention (boolean or additive float both work there) and
# "eager" *adds* it to the attention scores (so it must be additive float: a boolean mask would be
# added as 0/1 and silently ignored). Flash attention cannot take an arbitrary mask and flex attention
# wants a BlockMask, so those are refused rather than quietly computing the wrong thing.
_MASKABLE_ATTENTION = ("eager", "sdpa")

# Roles of the positions of a packed row [prefix | (suffix | chosen | rejected) per pair | padding]: the
# prefix and each pair's suffix are prompt; padding is told apart by its group (-1).
_PROMPT, _CHOSEN, _REJECTED = 0, 1, 2
_PAD_GROUP = -1


def _token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets[b, t] | logits[b, t]) for already aligned ``logits`` [B, T, V] and ``targets`` [B, T]."""
    # log_softmax in at least float32: in bf16 the log-normaliser over a large vocabulary loses ~2-3
    # digits, the same order as the log-ratio differences the preference losses live on. (float64 stays.)
    logps = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    return logps.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _masked_sum_or_mean(token_logps: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """Sum (or mean) of ``token_logps`` [B, T] over the positions where ``mask`` [B, T] is set: [B]."""
    mask = mask.bool()
    # torch.where rather than a product: a padded position's logit can be anything, and 0 * inf = nan.
    total = torch.where(mask, token_logps, 0.0).sum(-1)
    if not average:
        return total
    # A row with no target tokens scores 0 instead of 0/0 = nan (it then carries no gradient).
    return total / mask.sum(-1).clamp(min=1).to(total.dtype)


def sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    average: bool = False,
) -> torch.Tensor:
    """Log-probability of each sequence's masked tokens under a causal LM.

    The shift happens here, not in the caller: ``logits``, ``labels`` and ``loss_mask`` are all in the
    frame of the model's input, exactly as a causal LM returns them for ``input_ids``. ``logits[:, t]``
    is the distribution of token ``t + 1``, so::

        log p(y) = Σ_{t ≥ 1} loss_mask[:, t] · log softmax(logits[:, t - 1])[labels[:, t]]

    and the mean divides that by ``Σ_t loss_mask[:, t]`` (``average=True``). The last position's logits
    predict past the end and are never used; nothing predicts position 0, so ``loss_mask[:, 0]`` must
    be 0 (in practice it is a prompt or BOS token).

    Args:
        logits: [B, T, V] next-token logits at each input position.
        labels: [B, T] token ids (usually the ``input_ids`` themselves); any id where the mask is 0.
        loss_mask: [B, T] 1 (or True) on the tokens to score, e.g. the response; 0 on prompt and padding.
        average: mean over the scored tokens instead of the sum (TRL's IPO; FSPO sums).

    Returns:
        [B] per-sequence log-probabilities (sum, or mean when ``average``), in float32 or wider.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] with labels and loss_mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    if bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask[:, 0] must be 0: no logits predict the first token of a sequence")
    token_logps = _token_logps(logits[:, :-1], labels[:, 1:])
    return _masked_sum_or_mean(token_logps, loss_mask[:, 1:], average)


def sft_loss(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Pref-FT loss: mean negative log-likelihood per target token over the whole batch.

    Same inputs and same in-function shift as :func:`sequence_logps`::

        L_SFT = − Σ_{b,t} m[b, t] log p(labels[b, t] | labels[b, < t]) / Σ_{b,t} m[b, t]

    Token-averaged over the batch (every target token weighs the same, as in nanoGPT and HF's causal LM
    loss), not the mean of per-sequence means, which would up-weight short responses.

    Args:
        logits: [B, T, V] next-token logits at each input position.
        labels: [B, T] token ids in the input frame.
        loss_mask: [B, T] 1 on the target tokens (the preferred response); ``loss_mask[:, 0]`` must be 0.

    Returns:
        A scalar loss, float32 or wider (0 with no gradient if the mask selects nothing).
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits [B, T, V] with labels and loss_mask [B, T]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    if bool(loss_mask[:, 0].any()):
        raise ValueError("loss_mask[:, 0] must be 0: no logits predict the first token of a sequence")
    token_logps = _token_logps(logits[:, :-1], labels[:, 1:])
    mask = loss_mask[:, 1:].bool()
    return -torch.where(mask, token_logps, 0.0).sum() / mask.sum().clamp(min=1)


def response_logits(
    model: torch.nn.Module, prompt_ids: list[list[int]], target_ids: list[list[int]], *, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Logits for the target tokens only, of rows ``[prompt | target]``: the memory-lean forward behind
    Pref-FT on a real vocabulary.

    A causal LM's forward with labels computes [B, T, V] logits, every position over the whole
    vocabulary; with SmolLM2's 49,152 tokens and 8-shot prompts of ~1,200 tokens that tensor and its
    float32 log-softmax and gradient are several GB, while the loss needs only the target's positions.
    The rows are **left**-padded instead, so every target ends at the last column, and the model is
    asked for the last ``max(len(target)) + 1`` positions' logits only (``logits_to_keep``): the LM head
    then runs on those positions alone, through the architecture's own head (softcapping and all).
    Position ids count from each row's first real token, so a left-padded row is encoded as it would
    be alone.

    Returns ``(logits [B, K, V], labels [B, K], loss_mask [B, K], n_tokens)`` in one frame (K = the
    longest target + 1; ``loss_mask[:, 0]`` is 0), ready for :func:`sft_loss` or :func:`sequence_logps`;
    ``n_tokens`` counts the real (unpadded) input positions.
    """
    if not prompt_ids or len(prompt_ids) != len(target_ids):
        raise ValueError("response_logits needs one prompt per target and at least one row")
    if any(not p for p in prompt_ids):
        raise ValueError("every prompt needs at least one token (it predicts the target's first token)")
    device = _model_device(model)
    rows = [p + t for p, t in zip(prompt_ids, target_ids, strict=True)]
    width = max(map(len, rows))
    keep = max(map(len, target_ids)) + 1
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (row, t) in enumerate(zip(rows, target_ids, strict=True)):
        input_ids[i, width - len(row) :] = torch.tensor(row)
        attention_mask[i, width - len(row) :] = 1
        if t:
            loss_mask[i, width - len(t) :] = True
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    input_ids, attention_mask, position_ids = (
        input_ids.to(device),
        attention_mask.to(device),
        position_ids.to(device),
    )
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
    ).logits
    return logits, input_ids[:, -keep:], loss_mask[:, -keep:].to(device), int(attention_mask.sum())


def _log_ratio_margin(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """h = (π_c − π_r) − (ref_c − ref_r) and the implicit rewards β(π − ref), after checking inputs."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    shape = policy_chosen_logps.shape
    for name, t in (
        ("policy_rejected_logps", policy_rejected_logps),
        ("ref_chosen_logps", ref_chosen_logps),
        ("ref_rejected_logps", ref_rejected_logps),
    ):
        if t.shape != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    h = chosen_logratios - rejected_logratios
    # Rewards are for logging only: detached so a caller summing them into a metric cannot leak gradient.
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IPO loss per pair (FSPO stage 2; Azar et al. 2023, eq. 17)::

        h = (log π(y_w) − log π(y_l)) − (log π_ref(y_w) − log π_ref(y_l))
        L_IPO = (h − 1 / (2β))²

    The regression target 1/(2β) is large for FSPO's β = 0.01 (50 nats): the loss pulls the log-ratio
    margin towards a finite value instead of pushing it to infinity as DPO does. FSPO's reference code
    feeds summed log-probs; TRL feeds token-averaged ones. Choose with ``average`` in the log-prob
    functions; this function is the same either way.

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] log π of the preferred / dispreferred response.
        ref_chosen_logps, ref_rejected_logps: [B] the same under the frozen reference model.
        beta: regularisation strength β > 0 (τ in the IPO paper).

    Returns:
        ``(loss [B], chosen_rewards [B], rejected_rewards [B])`` where the rewards are β(log π − log π_ref),
        detached. Reduce the loss with ``.mean()``.
    """
    h, chosen_rewards, rejected_rewards = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return (h - 1 / (2 * beta)) ** 2, chosen_rewards, rejected_rewards


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """DPO loss per pair (Rafailov et al. 2023, eq. 7), with h as in :func:`ipo_loss`::

        L_DPO = − log σ(β h)

    Same arguments and returns as :func:`ipo_loss`.
    """
    h, chosen_rewards, rejected_rewards = _log_ratio_margin(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    # logsigmoid rather than log(sigmoid(.)): stays finite when β h is very negative.
    return -F.logsigmoid(beta * h), chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------------
# Scoring preference pairs with a causal LM


def _check_pairs(
    prompt_ids: list[list[int]], chosen_ids: list[list[int]], rejected_ids: list[list[int]]
) -> None:
    if not prompt_ids:
        raise ValueError("no pairs given")
    if not len(prompt_ids) == len(chosen_ids) == len(rejected_ids):
        raise ValueError(
            f"prompt_ids, chosen_ids and rejected_ids must have one entry per pair; got "
            f"{len(prompt_ids)}, {len(chosen_ids)}, {len(rejected_ids)}"
        )
    for i, (p, c, r) in enumerate(zip(prompt_ids, chosen_ids, rejected_ids, strict=True)):
        # An empty prompt leaves nothing to predict the first response token from.
        if not p or not c or not r:
            raise ValueError(
                f"pair {i}: prompt, chosen and rejected must each have at least one token "
                f"(got {len(p)}, {len(c)}, {len(r)})"
            )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def separate_pair_logps(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    *,
    average: bool = False,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Score each pair the plain way: rows ``[prompt | chosen]`` and ``[prompt | rejected]``.

    All 2B rows go through the model in one right-padded forward (as TRL's collator does), so each
    prompt is encoded twice. The reference for :func:`packed_pair_logps` and the baseline in ``bench/``.

    Args:
        model: a Hugging Face causal LM (anything called as ``model(input_ids=..., attention_mask=...,
            logits_to_keep=...)`` returning ``.logits``).
        prompt_ids, chosen_ids, rejected_ids: B token-id lists each; every list non-empty.
        average: mean log-prob per response token instead of the sum.
        pad_id: id written into padding (never attended and never scored, so its value is irrelevant).

    Returns:
        ``(chosen_logps [B], rejected_logps [B], n_tokens)`` where ``n_tokens`` = 2B × T is the number of
        input positions the model ran over, padding included.
    """
    _check_pairs(prompt_ids, chosen_ids, rejected_ids)
    device = _model_device(model)
    n = len(prompt_ids)
    rows = [p + c for p, c in zip(prompt_ids, chosen_ids, strict=True)]
    rows += [p + r for p, r in zip(prompt_ids, rejected_ids, strict=True)]
    prompt_lens = [len(p) for p in prompt_ids] * 2
    width = max(len(row) for row in rows)

    input_ids = torch.full((2 * n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((2 * n, width), dtype=torch.long)
    loss_mask = torch.zeros((2 * n, width), dtype=torch.bool)
    for i, (row, p_len) in enumerate(zip(rows, prompt_lens, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        loss_mask[i, p_len : len(row)] = True
    input_ids, attention_mask, loss_mask = (
        input_ids.to(device),
        attention_mask.to(device),
        loss_mask.to(device),
    )

    # Only positions from the shortest prompt's last token on predict a response token; skipping the
    # prompt's logits avoids a [2B, T, V] tensor that would dwarf the model's activations on long prompts.
    first = min(prompt_lens) - 1
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=width - first).logits
    # The kept logits start at position `first`, so slice labels and mask into the same frame; the
    # in-function shift of sequence_logps then lines logits[first + t] up with token first + t + 1.
    logps = sequence_logps(logits, input_ids[:, first:], loss_mask[:, first:], average=average)
    return logps[:n], logps[n:], 2 * n * width


def _packed_attention_mask(
    group: torch.Tensor, role: torch.Tensor, dtype: torch.dtype, attn_implementation: str
) -> torch.Tensor:
    """The [B, 1, T, T] mask of packed rows from their per-position ``group`` and ``role`` ids [B, T].

    ``group`` is 0 for the shared prefix, k >= 1 for the k-th pair's tokens and -1 for padding; ``role``
    is 0 for the prefix and a pair's own prompt suffix, 1 for chosen and 2 for rejected. Query q may see
    key k <= q when k is in the prefix, or in q's pair and either its suffix or q's own response; padding
    sees only itself (a fully masked row would give NaN attention and NaN gradients) and nothing sees it.
    """
    width = group.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool, device=group.device).tril()
    q_group, k_group = group[:, :, None], group[:, None, :]
    q_role, k_role = role[:, :, None], role[:, None, :]
    visible = (k_group == 0) | ((k_group == q_group) & ((k_role == _PROMPT) | (k_role == q_role)))
    is_pad = group == _PAD_GROUP
    allowed = causal & visible & ~is_pad[:, :, None] & ~is_pad[:, None, :]
    allowed = allowed | (torch.diag_embed(is_pad))
    allowed = allowed[:, None]  # one mask shared by all heads
    if attn_implementation == "sdpa":
        return allowed
    # eager adds the mask to the scores: 0 where allowed, the dtype's most negative finite value elsewhere
    # (what transformers itself uses; -inf would turn an all-masked row into NaN).
    return torch.zeros(allowed.shape, dtype=dtype, device=group.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _common_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens every row of ``rows`` shares."""
    n = min(map(len, rows))
    for i in range(n):
        t = rows[0][i]
        if any(r[i] != t for r in rows[1:]):
            return i
    return n


def packed_pair_logps(
    model: torch.nn.Module,
    prompt_ids: list[list[int]],
    chosen_ids: list[list[int]],
    rejected_ids: list[list[int]],
    *,
    average: bool = False,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Score each pair with its shared prompt encoded once: one row ``[prompt | chosen | rejected]``.

    Same results as :func:`separate_pair_logps` (to float rounding), in one forward over B rows of
    length max(P + C + R) instead of 2B rows of length max(P + max(C, R)). With FSPO's prompts (N shots,
    thousands of tokens) against responses of a few hundred, that is close to half the tokens.

    How the row is made to behave like two separate sequences:

    - a 4D attention mask [B, 1, T, T]: prompt tokens are causal among themselves; a chosen token sees
      the prompt and earlier chosen tokens; a rejected token sees the prompt and earlier rejected tokens
      but no chosen token; padding (right, up to the batch's longest row) sees only itself and is seen
      by nothing. It is boolean for ``sdpa`` and additive float (0 / dtype min) for ``eager``, passed as
      ``attention_mask``; transformers uses a 4D mask as given. Other attention implementations are
      refused with a ValueError. Costs to know: the mask is materialised (B·T² bytes as bool, 2-4× that
      as float), and with a mask SDPA cannot use its flash kernel on GPU (it takes the memory-efficient
      one), so measure the gain in ``bench/`` rather than assuming the token ratio.
    - position ids: prompt 0..P−1, chosen P..P+C−1, and rejected restarts at P (P..P+R−1), so its
      rotary positions are those it would have right after the prompt.
    - the gather: response token i is predicted by the logits of the position before it in its own
      branch. For chosen that is the previous input position, but the first rejected token's previous
      input position is the last chosen token, which rejected must not depend on: it is predicted from
      the last prompt token (position P − 1) instead, explicitly.

    This is :func:`packed_group_logps` with one pair per group.

    Args:
        model: a Hugging Face causal LM using ``eager`` or ``sdpa`` attention (``model.config._attn_implementation``).
        prompt_ids, chosen_ids, rejected_ids: B token-id lists each; every list non-empty.
        average: mean log-prob per response token instead of the sum.
        pad_id: id written into padding (never attended and never scored, so its value is irrelevant).

    Returns:
        ``(chosen_logps [B], rejected_logps [B], n_tokens)`` where ``n_tokens`` = B × T is the number of
        input positions the model ran over, padding included.
    """
    _check_pairs(prompt_ids, chosen_ids, rejected_ids)
    groups = [[t] for t in zip(prompt_ids, chosen_ids, rejected_ids, strict=True)]
    return packed_group_logps(model, groups, average=average, pad_id=pad_id)


def packed_group_logps(
    model: torch.nn.Module,
    groups: list[list[tuple[list[int], list[int], list[int]]]],
    *,
    average: bool = False,
    pad_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Score groups of pairs whose prompts share a prefix, the prefix encoded once per group.

    FSPO's episodes with several held-out targets: one user's N shots, then K questions of the same
    user, each with its chosen and rejected response. The K prompts differ only after the shots, so a
    group runs as one row ``[prefix | s1 | c1 | r1 | s2 | c2 | r2 | ...]``, where the prefix is the
    longest common token prefix of the group's prompts and ``s_k`` the rest of prompt k (its question).
    Each pair's tokens see the prefix and their own suffix and response (the mask, position ids and
    gather of :func:`packed_pair_logps`, per pair): every pair scores as it would alone, to float
    rounding, while the shots are encoded once for K targets instead of 2K times.

    Args:
        model: a Hugging Face causal LM using ``eager`` or ``sdpa`` attention.
        groups: per row, a non-empty list of ``(prompt_ids, chosen_ids, rejected_ids)``, each non-empty.
        average: mean log-prob per response token instead of the sum.
        pad_id: id written into padding (never attended and never scored).

    Returns:
        ``(chosen_logps, rejected_logps, n_tokens)``: one value per pair, in the order of the groups and
        of the pairs within each; ``n_tokens`` = rows × T, the input positions the model ran over.
    """
    attn_implementation = _check_groups(model, groups)
    device = _model_device(model)
    packed = _pack_groups(groups, pad_id)
    input_ids, position_ids = packed.input_ids.to(device), packed.position_ids.to(device)
    group, role = packed.group.to(device), packed.role.to(device)
    source, targets, slot = packed.source.to(device), packed.targets.to(device), packed.slot.to(device)
    dtype = cast(Any, model).get_input_embeddings().weight.dtype
    attention_mask = _packed_attention_mask(group, role, dtype, attn_implementation)

    # As in separate_pair_logps: no logits for prefix positions that predict no response token.
    first = min(packed.prefix_lens) - 1
    width = input_ids.shape[1]
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        logits_to_keep=width - first,
    ).logits
    # Rows of `logits` are positions first.., so index with source - first. Padded target slots point
    # at the row's position `first` (source 0 clamped); their value is discarded by the slot masks.
    index = (source - first).clamp(min=0)
    picked = logits.gather(1, index[:, :, None].expand(-1, -1, logits.shape[-1]))
    token_logps = _token_logps(picked, targets)
    # [rows, pairs] per response, then the pairs that exist, in order.
    n_pairs = max(map(len, groups))
    chosen = torch.stack(
        [_masked_sum_or_mean(token_logps, slot == 2 * k, average) for k in range(n_pairs)], 1
    )
    rejected = torch.stack(
        [_masked_sum_or_mean(token_logps, slot == 2 * k + 1, average) for k in range(n_pairs)], 1
    )
    exists = (
        torch.arange(n_pairs, device=device) < torch.tensor([len(g) for g in groups], device=device)[:, None]
    )
    return chosen[exists], rejected[exists], len(groups) * width


def _check_groups(model: torch.nn.Module, groups: list[list[tuple[list[int], list[int], list[int]]]]) -> str:
    """Refuse what packed scoring cannot do; returns the model's attention implementation."""
    if not groups or any(not g for g in groups):
        raise ValueError("packed_group_logps needs at least one group and at least one pair per group")
    for g in groups:
        _check_pairs(*(list(x) for x in zip(*g, strict=True)))
    attn_implementation = getattr(model.config, "_attn_implementation", None)
    if attn_implementation not in _MASKABLE_ATTENTION:
        raise ValueError(
            f"packed scoring needs an attention implementation that honours a custom 4D mask "
            f"({', '.join(_MASKABLE_ATTENTION)}); this model uses {attn_implementation!r}. Load it with "
            f"attn_implementation='sdpa' or use separate_pair_logps."
        )
    return attn_implementation


@dataclass
class _PackedGroups:
    """The rows of :func:`packed_group_logps`, on the CPU: inputs [rows, T] and, per row, the response
    tokens to score in order [c1..., r1..., c2..., ...], right-padded to the longest row's count: which
    input position holds each one's logits (``source``), its id (``targets``), and which slot (2k for
    pair k's chosen, 2k + 1 for its rejected, -1 for padding) it sums into."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    group: torch.Tensor  # 0: the shared prefix, k + 1: pair k's suffix and responses, _PAD_GROUP: padding
    role: torch.Tensor  # _PROMPT, _CHOSEN or _REJECTED
    source: torch.Tensor
    targets: torch.Tensor
    slot: torch.Tensor
    prefix_lens: list[int]


def _pack_groups(
    groups: list[list[tuple[list[int], list[int], list[int]]]], pad_id: int = 0
) -> _PackedGroups:
    """Lay each group out as one row ``[prefix | s1 | c1 | r1 | s2 | c2 | r2 | ...]``."""
    n = len(groups)
    # The prefix may be a whole prompt (one pair per group, or a prompt that is another's prefix); the
    # first response token is then predicted from the prefix's last token.
    prefix_lens = [_common_prefix_length([p for p, _, _ in g]) for g in groups]
    if min(prefix_lens) == 0:
        raise ValueError("the prompts of a group share no token: nothing to encode once")
    width = max(
        pl + sum(len(p) - pl + len(c) + len(r) for p, c, r in g)
        for g, pl in zip(groups, prefix_lens, strict=True)
    )
    n_targets = max(sum(len(c) + len(r) for _, c, r in g) for g in groups)
    packed = _PackedGroups(
        input_ids=torch.full((n, width), pad_id, dtype=torch.long),
        position_ids=torch.zeros((n, width), dtype=torch.long),
        group=torch.full((n, width), _PAD_GROUP, dtype=torch.long),
        role=torch.full((n, width), _PROMPT, dtype=torch.long),
        source=torch.zeros((n, n_targets), dtype=torch.long),
        targets=torch.zeros((n, n_targets), dtype=torch.long),
        slot=torch.full((n, n_targets), -1, dtype=torch.long),
        prefix_lens=prefix_lens,
    )
    for i, (g, pl) in enumerate(zip(groups, prefix_lens, strict=True)):
        prefix = g[0][0][:pl]
        packed.input_ids[i, :pl] = torch.tensor(prefix)
        packed.position_ids[i, :pl] = torch.arange(pl)
        packed.group[i, :pl] = 0
        at, t = pl, 0  # next input position, next target slot position
        for k, pair in enumerate(g):
            at, t = _pack_pair(packed, i, k, pair, pl, at, t)
    return packed


def _pack_pair(
    packed: _PackedGroups,
    i: int,
    k: int,
    pair: tuple[list[int], list[int], list[int]],
    pl: int,
    at: int,
    t: int,
) -> tuple[int, int]:
    """Write pair ``k`` of row ``i`` (prefix length ``pl``) from input position ``at`` and target slot
    position ``t``; returns the next of each."""
    p, c, r = pair
    s = p[pl:]
    s_len, c_len, r_len = len(s), len(c), len(r)
    end = at + s_len + c_len + r_len
    packed.input_ids[i, at:end] = torch.tensor(s + c + r)
    # positions: the suffix continues the prefix; chosen follows it and rejected restarts there.
    packed.position_ids[i, at : at + s_len + c_len] = torch.arange(pl, pl + s_len + c_len)
    packed.position_ids[i, at + s_len + c_len : end] = torch.arange(pl + s_len, pl + s_len + r_len)
    packed.group[i, at:end] = k + 1
    packed.role[i, at + s_len : at + s_len + c_len] = _CHOSEN
    packed.role[i, at + s_len + c_len : end] = _REJECTED
    # The first token of each response is predicted from the last prompt token of its pair (the
    # suffix's last, or the prefix's when the suffix is empty), never from the other response.
    last_prompt = at + s_len - 1 if s_len else pl - 1
    c0 = at + s_len
    packed.source[i, t] = last_prompt
    packed.source[i, t + 1 : t + c_len] = torch.arange(c0, c0 + c_len - 1)
    packed.source[i, t + c_len] = last_prompt
    packed.source[i, t + c_len + 1 : t + c_len + r_len] = torch.arange(c0 + c_len, end - 1)
    packed.targets[i, t : t + c_len + r_len] = torch.tensor(c + r)
    packed.slot[i, t : t + c_len] = 2 * k
    packed.slot[i, t + c_len : t + c_len + r_len] = 2 * k + 1
    return end, t + c_len + r_len
