"""The memory estimate of a training run (``modeling.train.memory``, ``fspo train memory``): its
parameter counts against the models built from the same configs, its activations against what
autograd keeps on a tiny model, and its layouts' arithmetic."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling.train import TrainConfig
from modeling.train.memory import GIB, Shape, estimate

RECIPE = Path(__file__).resolve().parents[2] / "docs" / "configs" / "llama-3.2-3b"


def _cfg(**fields) -> TrainConfig:
    return TrainConfig(**{"dataset": "-", "out_dir": "-", "init": "-", "stage": "ipo", **fields})


@pytest.fixture(scope="module")
def llama_3b() -> Shape:
    from transformers import AutoConfig

    return Shape.of(AutoConfig.from_pretrained(RECIPE / "model-config.json"))


def test_the_llama_3b_shape_counts_its_3_21_billion_parameters(llama_3b: Shape) -> None:
    # By hand: 28 blocks of q, o (3072²), k, v (3072 x 1024), the MLP (3 x 3072 x 8192) and two norms,
    # the 128,256 x 3072 embeddings (the head tied to them) and the final norm.
    block = 2 * 3072**2 + 2 * 3072 * 1024 + 3 * 3072 * 8192 + 2 * 3072
    assert llama_3b.block_params == block
    assert llama_3b.params == 28 * block + 128256 * 3072 + 3072 == 3_212_749_824


def test_lora_trains_as_many_parameters_as_peft_makes() -> None:
    from peft import LoraConfig, get_peft_model

    from modeling.tinymodel import tiny_llama

    model = tiny_llama(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_layers=2, num_heads=4, num_kv_heads=2
    )
    shape = Shape.of(model.config)
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = sum(p.numel() for p in peft.parameters() if p.requires_grad)
    assert estimate(_cfg(lora=True, lora_r=4), shape, processes=1, sharded=False).trained_params == trainable


def test_the_activations_are_what_autograd_keeps_for_the_backward_pass() -> None:
    """The packed IPO forward of a tiny fp32 model (SDPA), every tensor autograd saves counted once."""
    from modeling.losses import packed_pair_logps
    from modeling.tinymodel import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama(vocab_size=300, hidden_size=128, intermediate_size=384, num_layers=3, num_heads=4)
    model.config._attn_implementation = "sdpa"
    prompt, target, rows = 1000, 100, 2
    ids = [torch.randint(0, 300, (n,)).tolist() for n in (prompt, target, target) for _ in range(rows)]
    saved: dict[int, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        packed_pair_logps(model, ids[:rows], ids[rows : 2 * rows], ids[2 * rows :])
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    cfg = _cfg(batch_size=rows, max_prompt_tokens=prompt, max_target_tokens=target)
    e = estimate(cfg, Shape.of(model.config), processes=1, sharded=False)
    assert e.activations + e.logits == pytest.approx(measured, rel=0.03)


def test_gradient_checkpointing_keeps_a_small_part_of_the_activations(llama_3b: Shape) -> None:
    recipe = dict(dtype="bfloat16", batch_size=4, max_prompt_tokens=8192)
    off = estimate(_cfg(**recipe), llama_3b, processes=1, sharded=False)
    on = estimate(_cfg(**recipe, gradient_checkpointing=True), llama_3b, processes=1, sharded=False)
    assert on.activations < off.activations / 10
    assert on.weights == off.weights and on.optimizer == off.optimizer


def test_sharding_splits_the_state_and_ddp_keeps_its_gradient_buckets(llama_3b: Shape) -> None:
    cfg = _cfg(dtype="bfloat16", optimizer="rmsprop", batch_size=4)
    one = estimate(cfg, llama_3b, processes=1, sharded=False)
    ddp = estimate(cfg, llama_3b, processes=4, sharded=False)
    fsdp = estimate(cfg, llama_3b, processes=4, sharded=True)
    assert one.optimizer == one.gradients == 2 * llama_3b.params  # bf16, one RMSprop tensor per weight
    assert ddp.gradients == 2 * one.gradients and ddp.weights == one.weights
    assert fsdp.optimizer == one.optimizer / 4
    assert fsdp.weights == pytest.approx(one.weights / 4 + 2 * 2 * llama_3b.block_params)
    assert ddp.activations == pytest.approx(one.activations / 4)
    adam = estimate(_cfg(dtype="bfloat16", batch_size=4), llama_3b, processes=1, sharded=False)
    assert adam.optimizer == 2 * one.optimizer
    assert one.total / GIB == pytest.approx(one.weights / GIB * 3 + (one.activations + one.logits) / GIB)


def test_a_batch_that_does_not_split_over_the_gpus_is_refused(llama_3b: Shape) -> None:
    with pytest.raises(ValueError, match="batch_size 4 does not split over 8 processes"):
        estimate(_cfg(batch_size=4), llama_3b, processes=8, sharded=True)


def test_fspo_train_memory_prints_the_recipe_table(capsys: pytest.CaptureFixture[str]) -> None:
    from modeling.cli import main

    config, model = RECIPE / "ipo-lora.json", RECIPE / "model-config.json"
    assert main(["train", "memory", "--config", str(config), "--model-config", str(model)]) == 0
    printed = capsys.readouterr().out
    assert "3.21B params" in printed and "LoRA r16" in printed
    assert [
        line.split("|")[1].strip() for line in printed.splitlines() if line.startswith("| ") and "x" in line
    ] == [
        "1 GPU x1",
        "DDP x2",
        "FSDP x2",
        "DDP x4",
        "FSDP x4",
    ]


def test_fspo_train_memory_without_a_model_config_says_what_to_give(tmp_path: Path) -> None:
    from modeling.cli import main

    config = tmp_path / "run.json"
    config.write_text('{"init": "%s", "stage": "sft"}' % (tmp_path / "no-model"))
    with pytest.raises(SystemExit, match="give --model-config"):
        main(["train", "memory", "--config", str(config)])
