"""The objectives a step minimises, and the held-out evaluation that reports them.

``_sft_loss``: token-averaged NLL (pretrain, Pref-FT and the auxiliary terms). ``_pref_loss``: IPO / DPO
on the packed chosen and rejected log-probs of each pair (``_pair_logps``) against the reference's,
which ``_reference_logps`` computes once, before training, from the initial model.
"""

from __future__ import annotations

from typing import Any

import torch

from .config import Progress, TrainConfig
from .distributed import Ranks
from .examples import Example


def _sft_loss(model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int) -> tuple[torch.Tensor, int]:
    """Token-averaged NLL of the targets (all tokens for pretrain). Returns (loss, tokens processed).

    When only the responses are supervised (Pref-FT without shot targets), the logits are computed for
    the response positions alone (``response_logits``): on a real vocabulary the full [B, T, V] logits
    of a few-shot prompt are most of a step's memory."""
    from ..losses import response_logits, sft_loss

    if cfg.stage != "pretrain" and all(ex.prompt_labels is None for ex in examples):
        prompts, targets = [], []
        for ex in examples:
            for t in [ex.chosen] + ([ex.rejected] if cfg.sft_include_rejected else []):
                prompts.append(ex.prompt)
                targets.append(t)
        logits, labels, mask, n = response_logits(model, prompts, targets, pad_id=pad_id)
        return sft_loss(logits, labels, mask), n
    rows: list[list[int]] = []
    label_rows: list[list[int]] = []
    for ex in examples:
        targets = [ex.chosen] + ([ex.rejected] if cfg.sft_include_rejected else [])
        for t in targets:
            rows.append(ex.prompt + t)
            # pretrain: the whole sequence is text to model; Pref-FT: only the response (prompt masked).
            if cfg.stage == "pretrain":
                label_rows.append(ex.prompt + t)
            else:
                label_rows.append((ex.prompt_labels or [-100] * len(ex.prompt)) + t)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    att = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, label_rows, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        lab[i, : len(lb)] = torch.tensor(lb)
        att[i, : len(r)] = 1
    out = model(
        input_ids=ids.to(model.device), attention_mask=att.to(model.device), labels=lab.to(model.device)
    )
    return out.loss, int(att.sum())


def _sft_targets(examples: list[Example], cfg: TrainConfig) -> int:
    """How many tokens ``_sft_loss`` averages over (the supervised ones, after the next-token shift): a
    shard's share of its batch's, which weighs the shard's loss under several processes."""
    if cfg.stage != "pretrain" and all(ex.prompt_labels is None for ex in examples):
        return sum(len(ex.chosen) + (len(ex.rejected) if cfg.sft_include_rejected else 0) for ex in examples)
    n = 0
    for ex in examples:
        for t in [ex.chosen] + ([ex.rejected] if cfg.sft_include_rejected else []):
            if cfg.stage == "pretrain":
                n += len(ex.prompt) + len(t) - 1
            else:
                labels = (ex.prompt_labels or [-100] * len(ex.prompt)) + t
                n += sum(label != -100 for label in labels[1:])
    return n


def _pair_logps(
    model: Any, examples: list[Example], cfg: TrainConfig, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Chosen and rejected log-probs of a batch, the shared prompt computed once per pair (packed), and
    once per group for the targets of one group (``Example.group``)."""
    from ..losses import packed_group_logps, packed_pair_logps

    if any(e.group is not None for e in examples):
        groups: list[list[tuple[list[int], list[int], list[int]]]] = []
        for i, e in enumerate(examples):
            if i == 0 or e.group is None or e.group != examples[i - 1].group:
                groups.append([])
            groups[-1].append((e.prompt, e.chosen, e.rejected))
        return packed_group_logps(model, groups, average=cfg.average_logps, pad_id=pad_id)
    return packed_pair_logps(
        model,
        [e.prompt for e in examples],
        [e.chosen for e in examples],
        [e.rejected for e in examples],
        average=cfg.average_logps,
        pad_id=pad_id,
    )


def _pref_loss(
    model: Any, examples: list[Example], ref: torch.Tensor, cfg: TrainConfig, pad_id: int
) -> tuple[torch.Tensor, dict[str, float], int]:
    from ..losses import dpo_loss, ipo_loss

    pc, pr, n_tokens = _pair_logps(model, examples, cfg, pad_id)
    fn = ipo_loss if cfg.stage == "ipo" else dpo_loss
    losses, rc, rr = fn(pc, pr, ref[:, 0].to(pc), ref[:, 1].to(pc), cfg.beta)
    acc = float(((pc - pr) - (ref[:, 0] - ref[:, 1]).to(pc) > 0).float().mean())
    metrics = {"reward_margin": float((rc - rr).mean()), "pref_accuracy": acc, "pairs": len(examples)}
    return losses.mean(), metrics, n_tokens


@torch.no_grad()
def _reference_logps(
    model: Any, batches: list[list[Example]], cfg: TrainConfig, pad_id: int, progress: Progress | None
) -> torch.Tensor:
    """Log-probs of chosen and rejected under the frozen reference (the initial model), once:
    [steps, pairs, 2], pairs = the largest batch's (batch_size, times up to targets_per_episode)."""
    model.eval()
    out = torch.zeros(len(batches), max(map(len, batches)), 2, dtype=torch.float64)
    for s, ex in enumerate(batches):
        c, r, _ = _pair_logps(model, ex, cfg, pad_id)
        out[s, : len(ex), 0], out[s, : len(ex), 1] = c.double().cpu(), r.double().cpu()
        if progress and (s % 10 == 0 or s == len(batches) - 1):
            progress(s + 1, len(batches), "reference log-probs")
    model.train()
    return out


def evaluate_held_out(
    model: Any,
    batches: list[list[Example]],
    ref: torch.Tensor | None,
    cfg: TrainConfig,
    pad_id: int,
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """The stage's loss on the held-out users' batches (the mean of the batches' losses; for IPO / DPO
    weighed by batch size, with how often the policy's margin beats the reference's); the model is left
    in train mode. Under several processes each scores its share of the batches (``Ranks.share``) and
    the sums are gathered: every process gets the whole evaluation."""
    ranks = ranks or Ranks()
    loss_sum = acc_sum = 0.0
    model.eval()
    with torch.no_grad():
        for b, counted in ranks.share(len(batches)):
            ex = batches[b]
            if cfg.preference:
                assert ref is not None
                loss, m, _ = _pref_loss(model, ex, ref[b, : len(ex)], cfg, pad_id)
                loss_sum += counted * float(loss) * len(ex)
                acc_sum += counted * m["pref_accuracy"] * len(ex)
            else:
                loss_sum += counted * float(_sft_loss(model, ex, cfg, pad_id)[0])
    model.train()
    if not cfg.preference:
        return {"eval_loss": ranks.sum(loss_sum) / len(batches)}
    n = sum(map(len, batches))
    return {"eval_loss": ranks.sum(loss_sum) / n, "eval_pref_accuracy": ranks.sum(acc_sum) / n}
