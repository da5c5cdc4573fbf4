"""A run's setup, before its first step: data, model, reference log-probs, optimizer, and what a killed
run left to resume from (``Run`` holds it all for the loop)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..data import EpisodeSource, build_cot_prompt, cot_target
from .checkpoints import RESUME_DIR, check_model_dir, load_checkpoint_manifest, load_model, read_resume_state
from .config import MANIFEST, Progress, TrainConfig
from .distributed import Ranks
from .examples import Example, _examples, _ptx_config, held_out_examples, prompt_limit
from .objectives import _reference_logps, evaluate_held_out


class AuxTerm(NamedTuple):
    """A language-modelling term beside the stage's loss: its metric's name, its weight, the source of
    its batches and how they are drawn and scored."""

    metric: str
    weight: float
    source: EpisodeSource
    cfg: TrainConfig


@dataclass
class Run:
    """Everything the loop needs, set up once (``setup_run``); ``history`` and ``cut`` grow as it runs."""

    cfg: TrainConfig
    out_dir: Path
    src: EpisodeSource
    aux_terms: list[AuxTerm]
    model: Any
    tok: Any
    init_manifest: dict[str, Any]
    limit: int
    pad_id: int
    ref_all: torch.Tensor | None  # [steps, pairs, 2]: the reference's chosen and rejected log-probs
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    eval_batches: list[list[Example]]
    eval_ref: torch.Tensor | None
    ranks: Ranks = field(default_factory=Ranks)
    # The model the steps call: ``model`` itself, or under several processes its DDP wrapper.
    net: Any = None
    start_step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, int] = field(default_factory=lambda: {"prompts_cut": 0, "shots_cut": 0})

    def evaluate(self) -> dict[str, float]:
        return evaluate_held_out(
            self.model, self.eval_batches, self.eval_ref, self.cfg, self.pad_id, self.ranks
        )


def setup_run(  # long: the run's parts in the order they depend on each other, read top to bottom
    cfg: TrainConfig, device: str, progress: Progress | None, ranks: Ranks | None = None
) -> Run:
    """Open the data, build or load the model (or the killed run's), compute the reference log-probs
    (IPO / DPO; ``ranks`` share them out) and make the optimizer, restoring a resumed run's state and RNG."""
    from ..llm import context_length

    if cfg.init is not None:  # bad input changes nothing: refused before the run folder exists
        check_model_dir(cfg.init)
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    src, eval_src, aux_terms = open_sources(cfg)
    torch.manual_seed(cfg.seed)
    state = read_resume_state(out_dir, cfg)
    ranks = ranks or Ranks()
    with ranks.main_first():  # the tiny model's tokenizer is written to out_dir
        model, tok, init_manifest = start_model(cfg, src, out_dir, device, resume=state is not None)
    prepare_model(model, cfg)
    limit = prompt_limit(cfg, context_length(model))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    # Reference log-probs for every training batch, once, from the initial (= reference) model.
    ref_all = None
    if cfg.preference:
        if state is not None:
            ref_all = state["ref"]
        else:
            # Each distinct batch once: an overfit run cycles over its first K (examples._step_draw).
            distinct = min(cfg.steps, cfg.overfit_batches) if cfg.overfit_batches else cfg.steps
            batches = [_examples(src, tok, cfg, s, limit=limit) for s in range(distinct)]
            ref_all = ranks.reference_logps(
                lambda bs: _reference_logps(model, bs, cfg, pad_id, progress), batches
            )
            if distinct < cfg.steps:
                ref_all = ref_all[torch.arange(cfg.steps) % distinct]
    examples = held_out_examples(eval_src, tok, cfg, limit)
    eval_batches = [examples[i : i + cfg.batch_size] for i in range(0, len(examples), cfg.batch_size)]
    # The held-out pairs' reference log-probs, also once (a resumed run reads them back).
    eval_ref = None
    if cfg.preference:
        eval_ref = (
            state["eval_ref"]
            if state is not None
            else ranks.reference_logps(
                lambda bs: _reference_logps(model, bs, cfg, pad_id, None), eval_batches
            )
        )
    # After the reference log-probs (the whole model on each process) and before the optimizer: sharding
    # replaces the parameters with sharded ones.
    net = ranks.prepare(model)
    params, opt, sched = make_optimizer(model, cfg)
    if state is not None:
        ranks.load_optimizer_state(model, opt, state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
    run = Run(
        cfg=cfg,
        out_dir=out_dir,
        src=src,
        aux_terms=aux_terms,
        model=model,
        tok=tok,
        init_manifest=init_manifest,
        limit=limit,
        pad_id=pad_id,
        ref_all=ref_all,
        params=params,
        opt=opt,
        sched=sched,
        eval_batches=eval_batches,
        eval_ref=eval_ref,
        ranks=ranks,
        net=net,
    )
    if state is not None:
        run.start_step, run.history = state["step"], state["history"]
        run.cut = state.get("cut") or run.cut
    model.train()
    return run


def open_sources(cfg: TrainConfig) -> tuple[EpisodeSource, EpisodeSource, list[AuxTerm]]:
    """The training and held-out episodes, and the auxiliary terms' sources: ptx draws the base's
    documents; cot_nll the CoT Pref-FT view of the step's own episodes (same seed, so the same users and
    targets)."""
    src = EpisodeSource(cfg.dataset, split="train", all_questions=cfg.stage == "pretrain")
    # The base's documents (the pretrain stage's, or a fine-tuning stage's ptx batches) need the styles.
    if (cfg.stage == "pretrain" or cfg.ptx) and cfg.pretrain_consistent and src.styled_answers is None:
        raise ValueError(
            f"{cfg.dataset}: pretrain_consistent needs each response's trait values (trait_* columns in "
            "responses.parquet), and this dataset has none; use pretrain_consistent 0"
        )
    eval_src = EpisodeSource(cfg.dataset, split="test")
    aux_terms: list[AuxTerm] = []
    if cfg.ptx:
        ptx_src = EpisodeSource(cfg.dataset, split="train", all_questions=True)
        aux_terms.append(AuxTerm("ptx_loss", cfg.ptx, ptx_src, _ptx_config(cfg)))
    if cfg.cot_nll:
        cot_cfg = dataclasses.replace(cfg, stage="sft", cot_nll=0.0, ptx=0.0, targets_per_episode=1)
        aux_terms.append(AuxTerm("cot_nll", cfg.cot_nll, src, cot_cfg))
    return src, eval_src, aux_terms


def start_model(
    cfg: TrainConfig, src: EpisodeSource, out_dir: Path, device: str, *, resume: bool
) -> tuple[Any, Any, dict[str, Any]]:
    """(model, tokenizer, init's manifest): the killed run's checkpoint, a new tiny model, the init
    LoRA checkpoint's adapter (trained on), or the init model (with a new adapter under ``lora``)."""
    if resume:
        model, tok = load_model(out_dir / RESUME_DIR, dtype=cfg.dtype, trainable=True, device=device)
        return model, tok, {}
    if cfg.init is None:
        model, tok = build_tiny_model(src, out_dir, cfg)
        return model.to(device), tok, {}
    if cfg.lora and _init_is_lora(cfg.init):
        # Stage 2 from a LoRA Pref-FT: IPO is initialised from stage 1, so it trains the same adapter on
        # (the reference log-probs are computed from it before the first step). A new adapter on the
        # merged weights would be saved naming the bare base, and load without stage 1's update.
        init_manifest = load_checkpoint_manifest(cfg.init)
        model, tok = load_model(cfg.init, dtype=cfg.dtype, trainable=True, device=device)
        return model, tok, init_manifest
    init_manifest = load_checkpoint_manifest(cfg.init) if (Path(cfg.init) / MANIFEST).exists() else {}
    model, tok = load_model(cfg.init, dtype=cfg.dtype, device=device)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules="all-linear",
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
    return model, tok, init_manifest


def prepare_model(model: Any, cfg: TrainConfig) -> None:
    """Frozen embeddings, gradient checkpointing and no dropout, as the config says."""
    if cfg.freeze_embeddings:
        for module in (model.get_input_embeddings(), model.get_output_embeddings()):
            if module is not None:
                module.weight.requires_grad_(False)
    if cfg.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so it works with LoRA (whose
        # frozen embeddings would otherwise leave the checkpointed blocks without a gradient path).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    disable_dropout(model)


def make_optimizer(
    model: Any, cfg: TrainConfig
) -> tuple[list[torch.nn.Parameter], torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The trainable parameters, their optimizer and its learning-rate schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(
            params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
        )
    else:
        opt = torch.optim.RMSprop(params, lr=cfg.lr)
    return params, opt, torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))  # cosine to 10% of the peak

    return f


def disable_dropout(model: Any) -> int:
    """Turn every dropout in ``model`` off (nn.Dropout modules and attention dropout rates); returns
    how many were on."""
    n = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            module.p, n = 0.0, n + 1
        rate = getattr(module, "attention_dropout", None)
        if isinstance(rate, float) and rate > 0:
            module.attention_dropout, n = 0.0, n + 1
    return n


def build_tiny_model(src: EpisodeSource, out_dir: Path, cfg: TrainConfig) -> tuple[Any, Any]:
    """A tiny Llama-architecture decoder (``modeling.tinymodel.tiny_llama`` of ``cfg.tiny``'s shape) with
    random weights and a byte-level BPE tokenizer trained on the dataset's own text (questions,
    responses, personas and the prompt format's headers). Seeds the global RNG with ``cfg.seed`` before
    the weights are drawn: training continues from that stream."""
    from ..tinymodel import tiny_llama, train_tokenizer

    rng = random.Random(cfg.seed)
    texts = list(src.questions.text) + rng.sample(src.responses, min(len(src.responses), 5000))
    texts += rng.sample(list(src.descriptions.values()), min(len(src.descriptions), 2000))
    texts += [
        build_cot_prompt(e.shots, e.question, instruction=e.instruction)
        + cot_target(e.description or "", e.chosen or "")
        for e in src.sample(50, shots=2, seed=cfg.seed)
    ]
    tok = train_tokenizer(texts, out_dir / "tokenizer", vocab_size=cfg.tiny["vocab_size"])
    t = cfg.tiny
    model = tiny_llama(
        vocab_size=len(tok),
        hidden_size=t["hidden_size"],
        intermediate_size=t["intermediate_size"],
        num_layers=t["num_layers"],
        num_heads=t["num_heads"],
        max_position_embeddings=max(4096, cfg.max_prompt_tokens + 2 * cfg.max_target_tokens + 8),
        tie_word_embeddings=True,
        tokenizer=tok,
        seed=cfg.seed,
        private_rng=False,
    )
    return model, tok


def _count_params(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def _init_is_lora(init: str | None) -> bool:
    return init is not None and (Path(init) / "adapter_config.json").is_file()


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"
