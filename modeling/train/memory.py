"""The memory a training run needs on each GPU, computed from its config and the model's shape
(``fspo train memory``).

Per process, in bytes:

- weights: every parameter in the config's dtype; sharded (FSDP2), 1/N of them plus the two decoder
  blocks that are gathered whole at a time (the one running and the one prefetched);
- gradients: one per trained parameter, in the weights' dtype (1/N sharded). DDP keeps them twice:
  the parameters' ``.grad`` and its communication buckets (``gradient_as_bucket_view`` is off);
- optimizer: the optimizer's state per trained parameter, in the weights' dtype (the loop keeps no fp32
  master copy): RMSprop one tensor (its running mean of squares), AdamW two (1/N sharded);
- activations: what autograd keeps for the backward pass of one step's forward (``activation_bytes``),
  over this process's rows (``batch_size / N`` episodes, each one packed row: the prompt, then the
  chosen and rejected responses). With gradient checkpointing, each decoder block's input only, plus
  one block's activations while it is recomputed;
- logits: the response positions' logits only (the losses ask for no others): in the weights' dtype,
  and their float32 log-softmax.

The reference model costs nothing: IPO's reference log-probs are computed before training. Not
counted: the CUDA context and allocator slack (about 1-2 GiB in practice), NCCL's buffers, and the
temporaries of a single op.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from .config import TrainConfig

GIB = 1024**3


@dataclass(frozen=True)
class Shape:
    """What the estimate needs of a decoder-only transformer (a Llama-style Hugging Face config)."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    params: int  # every parameter, a tied head counted once
    block_params: int  # one decoder block's
    lora_params: int  # a LoRA adapter of rank 1 on every linear layer but the head (peft's all-linear)
    embedding_params: int  # the token embeddings and the head (once when tied)

    @classmethod
    def of(cls, hf_config: Any) -> Shape:
        """Counted on the model built from ``hf_config`` on the meta device (no memory, no weights)."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
        head, embed = model.get_output_embeddings(), model.get_input_embeddings()
        lora = sum(
            m.in_features + m.out_features
            for m in model.modules()
            if isinstance(m, torch.nn.Linear) and m is not head
        )
        layers = model.model.layers
        return cls(
            layers=len(layers),
            hidden=int(hf_config.hidden_size),
            intermediate=int(hf_config.intermediate_size),
            vocab=int(hf_config.vocab_size),
            params=sum(p.numel() for p in model.parameters()),
            block_params=sum(p.numel() for p in layers[0].parameters()),
            lora_params=lora,
            embedding_params=sum(p.numel() for p in {*embed.parameters(), *head.parameters()}),
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process of one layout (``processes`` of them, ``sharded`` or data parallel)."""

    processes: int
    sharded: bool
    params: int
    trained_params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    logits: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits


def dtype_bytes(cfg: TrainConfig) -> int:
    return 2 if cfg.dtype == "bfloat16" else 4


def activation_bytes(shape: Shape, rows: int, tokens: int, dtype_size: int) -> float:
    """What autograd keeps of one Llama decoder block's forward over ``rows`` packed rows of ``tokens``
    positions (SDPA attention: no T x T score matrix is kept), counted tensor by tensor:

    - each RMSNorm (two per block): its input upcast to float32 (4 h), its normalised input in the
      weights' dtype and its output (2 s h);
    - attention: the rotated queries, the keys and the values as SDPA keeps them (repeated to every
      query head: transformers repeats them when a mask is given, as the packed rows' is) and its output,
      which the output projection keeps too (4 s h); and the packed rows' mask, which SDPA converts
      from boolean to additive in the weights' dtype and keeps, in every block (s T per position);
    - the MLP: the gate and up projections' outputs, the SiLU's output and the product fed to the down
      projection (4 s I).

    ``s`` is the weights' dtype size, h the hidden size, I the MLP's. Checked against autograd's saved
    tensors on a tiny model (tests/modeling/test_train_memory.py)."""
    h, i, s = shape.hidden, shape.intermediate, dtype_size
    return rows * tokens * (2 * (4 * h + 2 * s * h) + 4 * s * h + 4 * s * i + s * tokens)


def row_tokens(cfg: TrainConfig) -> tuple[int, int]:
    """(positions of one packed row, positions whose logits are kept) at the config's longest prompt:
    IPO / DPO pack the prompt and both responses of each target in one row, Pref-FT the prompt and the
    chosen response (and the rejected one in a row of its own with ``sft_include_rejected``)."""
    p, t = cfg.max_prompt_tokens, cfg.max_target_tokens
    if cfg.preference:
        k = cfg.targets_per_episode  # the shots once, each target's question counted in its responses
        return p + 2 * k * t, 2 * k * t + 1
    return p + t, t


def estimate(cfg: TrainConfig, shape: Shape, *, processes: int, sharded: bool) -> MemoryEstimate:
    """The bytes each of ``processes`` processes needs to train ``cfg`` on a model of ``shape``."""
    if cfg.batch_size % processes:
        raise ValueError(f"batch_size {cfg.batch_size} does not split over {processes} processes")
    s = dtype_bytes(cfg)
    if cfg.lora:
        trained = cfg.lora_r * shape.lora_params
    else:
        trained = shape.params - (shape.embedding_params if cfg.freeze_embeddings else 0)
    share = processes if sharded else 1
    weights = s * (shape.params / share + (2 * shape.block_params if sharded and processes > 1 else 0))
    if cfg.lora:  # the adapter's weights, beside the base's
        weights += s * trained / share
    ddp_buckets = 2 if processes > 1 and not sharded else 1
    states = 1 if cfg.optimizer == "rmsprop" else 2
    rows = cfg.batch_size // processes * (2 if cfg.sft_include_rejected and not cfg.preference else 1)
    tokens, kept = row_tokens(cfg)
    block = activation_bytes(shape, rows, tokens, s)
    if cfg.gradient_checkpointing:
        layers = rows * tokens * shape.hidden * s * shape.layers + block
    else:
        layers = block * shape.layers
    final_norm = rows * tokens * (4 + s) * shape.hidden
    return MemoryEstimate(
        processes=processes,
        sharded=sharded,
        params=shape.params,
        trained_params=trained,
        weights=weights,
        gradients=s * trained / share * ddp_buckets,
        optimizer=states * s * trained / share,
        activations=layers + final_norm,
        logits=rows * kept * shape.vocab * (s + 4),
    )


def memory_table(cfg: TrainConfig, shape: Shape, layouts: list[tuple[int, bool]]) -> list[dict[str, Any]]:
    """One row per layout (processes, sharded), in GiB: the parts, then the activations and the total
    with gradient checkpointing and without it (whatever the config says)."""
    rows = []
    for processes, sharded in layouts:
        on, off = (
            estimate(replace(cfg, gradient_checkpointing=c), shape, processes=processes, sharded=sharded)
            for c in (True, False)
        )
        rows.append(
            {
                "layout": f"{'FSDP' if sharded else 'DDP' if processes > 1 else '1 GPU'} x{processes}",
                "weights": on.weights / GIB,
                "gradients": on.gradients / GIB,
                "optimizer": on.optimizer / GIB,
                "logits": on.logits / GIB,
                "activations, checkpointing": on.activations / GIB,
                "total, checkpointing": on.total / GIB,
                "activations, no checkpointing": off.activations / GIB,
                "total, no checkpointing": off.total / GIB,
            }
        )
    return rows
