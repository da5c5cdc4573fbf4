"""The training loop: one visible loop for every stage (evaluate → forward and backward → clip → step →
log → checkpoint), then the published checkpoint."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .checkpoints import RESUME_DIR, RESUME_STATE, _save, publish
from .config import Progress, TrainConfig
from .distributed import Ranks
from .examples import Example, _examples
from .objectives import _pref_loss, _sft_loss, _sft_targets
from .setup import Run, _count_params, default_device, setup_run


@dataclass
class TrainResult:
    out_dir: Path
    metrics: dict[str, Any]


def train(
    cfg: TrainConfig,
    *,
    progress: Progress | None = None,
    log: Callable[[dict[str, Any]], None] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Run one stage. Resumes from ``out_dir/checkpoint-last`` when it holds the same config.

    ``device``: where the model trains (default: cuda when visible, else cpu); not part of the config,
    so a run started on one device resumes on another."""
    device = device or default_device()
    ranks = Ranks.start(device, cfg.batch_size)
    if not ranks.is_main:  # progress and logs from the main process only
        progress, log = None, None
    run = setup_run(cfg, ranks.device(device), progress, ranks)
    if not run.history:
        run.history.append({"step": 0, **run.evaluate()})
    elif log:  # a killed run going on: the log says from where
        log({"step": run.start_step, "resumed_from": RESUME_DIR})
    tokens, t0 = 0, time.perf_counter()
    for step in range(run.start_step, cfg.steps):
        examples = _examples(run.src, run.tok, cfg, step, limit=run.limit)
        run.cut["prompts_cut"] += sum(ex.shots_cut > 0 for ex in examples)
        run.cut["shots_cut"] += sum(ex.shots_cut for ex in examples)
        loss_value, n, metrics = _backward(run, examples, step)
        # Clip the global gradient norm: from-scratch tiny models spike early otherwise.
        gnorm = float(torch.nn.utils.clip_grad_norm_(run.params, cfg.grad_clip))
        run.opt.step()
        run.sched.step()
        tokens += n
        done = step + 1
        if progress:
            progress(done, cfg.steps, f"{cfg.stage} loss {loss_value:.3f}")
        if done % cfg.eval_every == 0 or done == cfg.steps:
            row = {
                "step": done,
                "loss": loss_value,
                "grad_norm": gnorm,
                "lr": run.sched.get_last_lr()[0],
                "tokens_per_s": tokens / max(time.perf_counter() - t0, 1e-9),
                **metrics,
                **run.cut,
                **run.evaluate(),
            }
            run.history.append(row)
            if log:
                log(row)
        if done % cfg.save_every == 0 and done < cfg.steps:
            _save_resume_point(run, done)
    metrics = _publish(run)
    ranks.end()
    return TrainResult(out_dir=run.out_dir, metrics=metrics)


def _backward(run: Run, examples: list[Example], step: int) -> tuple[float, int, dict[str, float]]:
    """Forward and backward of the step's loss: the stage's, then each auxiliary term's (a backward
    each: one graph held at a time). Returns the whole batch's total loss, the tokens processed and the
    step's metrics.

    Under several processes each trains on its shard of the batch (``Ranks.shard``), its loss scaled
    so that the averaged gradients are the whole batch's (``Ranks.scale``), and the loss and metrics
    are the whole batch's (``Ranks.mean``, ``Ranks.weighted``)."""
    cfg, net, ranks = run.cfg, run.net, run.ranks
    mine = ranks.shard(examples)
    shard = [examples[i] for i in mine]
    if cfg.preference:
        assert run.ref_all is not None
        loss, metrics, n = _pref_loss(net, shard, run.ref_all[step, mine], cfg, run.pad_id)
        loss = ranks.scale(loss, len(shard))
        metrics = {
            "reward_margin": ranks.weighted(metrics["reward_margin"], len(shard)),
            "pref_accuracy": ranks.weighted(metrics["pref_accuracy"], len(shard)),
            "pairs": int(ranks.sum(len(shard))),
        }
    else:
        loss, n = _sft_loss(net, shard, cfg, run.pad_id)
        loss = ranks.scale(loss, _sft_targets(shard, cfg) if ranks.world > 1 else 0)
        metrics = {}
    run.opt.zero_grad(set_to_none=True)
    with ranks.sync(net, last=not run.aux_terms):
        loss.backward()
    for k, term in enumerate(run.aux_terms):
        aux = _examples(term.source, run.tok, term.cfg, step, limit=run.limit)
        aux = [aux[i] for i in ranks.shard(aux)]
        lm, n_lm = _sft_loss(net, aux, term.cfg, run.pad_id)
        lm = ranks.scale(lm, _sft_targets(aux, term.cfg) if ranks.world > 1 else 0)
        with ranks.sync(net, last=k == len(run.aux_terms) - 1):
            (term.weight * lm).backward()
        metrics[term.metric] = ranks.mean(float(lm.detach()))
        loss, n = loss.detach() + term.weight * lm.detach(), n + n_lm
    return ranks.mean(float(loss.detach())), int(ranks.sum(n)), metrics


def _save_resume_point(run: Run, done: int) -> None:
    """``checkpoint-last``: the model and everything a killed run needs to go on as if it had not been
    (written by the main process; the others wait for it). Sharded, every process first takes part in
    gathering the weights and the optimizer state."""
    weights = run.ranks.full_state(run.model)
    optimizer = run.ranks.optimizer_state(run.model, run.opt)
    if not run.ranks.is_main:
        run.ranks.wait()
        return
    state = {
        "step": done,
        "optimizer": optimizer,
        "scheduler": run.sched.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "history": run.history,
        "cut": run.cut,
        "ref": run.ref_all,
        "eval_ref": run.eval_ref,
    }
    _save(run.model, run.tok, run.out_dir / RESUME_DIR, run.cfg, {"files": {RESUME_STATE: state}}, weights)
    run.ranks.wait()


def _publish(run: Run) -> dict[str, Any]:
    """Write the finished checkpoint with its manifest (config, domain, metrics); returns the metrics."""
    cfg, tok = run.cfg, run.tok
    total, trainable = _count_params(run.model)
    metrics = {
        "history": run.history,
        "final": run.history[-1],
        "params": total,
        "trainable_params": trainable,
        "prompt_limit": run.limit,
        **run.cut,
    }
    extra = {
        "stage": cfg.stage,
        "context": cfg.context,
        "cot": cfg.cot,
        "domain": run.src.domain,
        "instruction": run.src.instruction,
        "init": cfg.init,
        "init_stage": run.init_manifest.get("stage"),
        "metrics": metrics,
        "tokenizer": getattr(tok, "name_or_path", None) or "trained-from-dataset",
    }
    weights = run.ranks.full_state(run.model)  # sharded: gathered by every process
    if run.ranks.is_main:  # one writer; the others wait for the checkpoint to exist
        publish(run.model, tok, run.out_dir, cfg, extra, weights)
    run.ranks.wait()
    return metrics
