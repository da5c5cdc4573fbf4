"""FSPO training on a real pretrained model (SmolLM2-135M-Instruct, LoRA), on tiny budgets: the prompt's
tokens, both losses, the adapter chain Pref-FT -> IPO, the context limit, and the lean Pref-FT logits."""

from __future__ import annotations

import json
import random

import pytest
import torch

from modeling.data import EpisodeSource
from modeling.train import (
    CheckpointError,
    TrainConfig,
    disable_dropout,
    load_model,
    prompt_limit,
    tokenize_episode,
    train,
)
from tests.modeling.test_losses import tiny_llama

# Two steps of two 1-shot episodes with 16-token responses: a few seconds a stage on two cores.
REAL = dict(
    shots=(1, 1),
    steps=2,
    batch_size=2,
    eval_every=2,
    save_every=10,
    eval_episodes=2,
    warmup_steps=1,
    max_target_tokens=16,
    lora=True,
    lora_r=4,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from modeling.synth import generate_dataset

    out = tmp_path_factory.mktemp("ds") / "elix"
    return str(generate_dataset(out_dir=out, domain="elix", users=60, pairs_per_user=10, seed=0).path)


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def pref_ft(dataset, smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "pref-ft"
    return train(
        TrainConfig(dataset=dataset, out_dir=str(out), stage="sft", init=str(smollm2_dir), lr=1e-3, **REAL)
    )


def test_an_fspo_prompt_starts_with_its_markdown_not_smollm2s_chat_bos(
    dataset, smollm2_dir, smollm2_tokenizer
):
    ep = EpisodeSource(dataset, split="train").sample(1, shots=1, seed=0)[0]
    cfg = TrainConfig(dataset=dataset, out_dir="unused", stage="sft", init=str(smollm2_dir), **REAL)
    ex = tokenize_episode(smollm2_tokenizer, ep, cfg)
    assert smollm2_tokenizer.bos_token == "<|im_start|>"
    assert smollm2_tokenizer.decode(ex.prompt).startswith("# Example 1\n## Question\n")
    assert smollm2_tokenizer.bos_token_id not in ex.prompt
    assert ex.chosen[-1] == smollm2_tokenizer.eos_token_id == 2  # <|im_end|> ends every target
    wrapped = tokenize_episode(
        smollm2_tokenizer, ep, TrainConfig(**{**cfg.to_dict(), "chat_template": True, "tiny": cfg.tiny})
    )
    text = smollm2_tokenizer.decode(wrapped.prompt)
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\n")
    assert "# Example 1\n## Question\n" in text


def test_a_prompt_over_the_limit_drops_its_earliest_shots_and_keeps_its_target(
    dataset, smollm2_dir, smollm2_tokenizer
):
    ep = EpisodeSource(dataset, split="train").sample(1, shots=4, seed=1)[0]
    cfg = TrainConfig(dataset=dataset, out_dir="unused", stage="sft", init=str(smollm2_dir), **REAL)
    whole = tokenize_episode(smollm2_tokenizer, ep, cfg)
    cut = tokenize_episode(smollm2_tokenizer, ep, cfg, limit=len(whole.prompt) - 1)
    assert whole.shots_cut == 0 and cut.shots_cut == 1
    text = smollm2_tokenizer.decode(cut.prompt)
    assert ep.shots[0].question not in text  # the earliest shot went
    assert all(s.question in text for s in ep.shots[1:])
    assert text.rstrip().endswith(f"## Question\n{ep.question}\n## Preferred Response")
    # The model's context bounds the limit: room is always left for the response and its EOS.
    assert prompt_limit(cfg, 8192) == min(cfg.max_prompt_tokens, 8192 - 17)
    assert prompt_limit(dataclass_replace(cfg, max_prompt_tokens=100_000), 8192) == 8192 - 17
    with pytest.raises(ValueError, match="leaves no room for a prompt"):
        prompt_limit(cfg, 10)


def dataclass_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_lora_pref_ft_on_smollm2_lowers_the_loss_of_the_preferred_response(pref_ft, smollm2_dir):
    history = pref_ft.metrics["history"]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    adapter = json.loads((pref_ft.out_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(smollm2_dir.resolve())
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= set(
        adapter["target_modules"]
    )  # every linear layer of the architecture but the output head
    assert pref_ft.metrics["trainable_params"] < pref_ft.metrics["params"] / 50


@pytest.mark.slow
def test_lora_ipo_continues_the_pref_ft_adapter_from_the_reference(pref_ft, dataset, smollm2_dir, tmp_path):
    # A learning rate too small to move the weights: IPO's checkpoint must then be Pref-FT's model. A new
    # adapter on the merged Pref-FT weights would be saved naming the bare base and load without them.
    ipo = train(
        TrainConfig(
            dataset=dataset,
            out_dir=str(tmp_path / "fspo"),
            stage="ipo",
            init=str(pref_ft.out_dir),
            beta=0.1,
            lr=1e-12,
            **REAL,
        )
    )
    # At step 0 the policy is its reference exactly (no dropout noise): h = 0, loss (1 / (2 * 0.1))^2.
    assert ipo.metrics["history"][0]["eval_loss"] == pytest.approx(25.0, abs=1e-4)
    assert ipo.metrics["history"][0]["eval_pref_accuracy"] == 0.0
    ids = torch.tensor([[19, 12066, 216, 33, 198, 1277, 7093]])
    logits = {}
    for name, path in (("base", smollm2_dir), ("pref-ft", pref_ft.out_dir), ("ipo", ipo.out_dir)):
        model, _ = load_model(path)
        with torch.no_grad():
            logits[name] = model(ids).logits
    assert not torch.allclose(logits["pref-ft"], logits["base"], atol=1e-3)
    torch.testing.assert_close(logits["ipo"], logits["pref-ft"], atol=1e-4, rtol=0)


def test_dropout_is_off_in_a_trained_model():
    model = tiny_llama(attention_dropout=0.5).train()
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    assert not torch.equal(model(ids).logits, model(ids).logits)  # dropout on: two passes differ
    assert disable_dropout(model) == 2  # the attention dropout of both layers
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_pref_ft_scores_the_response_positions_alone_with_the_full_logits_loss_and_gradients():
    from modeling.losses import response_logits, sft_loss

    model = tiny_llama(vocab_size=97)
    rng = random.Random(0)
    prompts = [[rng.randrange(1, 97) for _ in range(rng.randint(3, 30))] for _ in range(5)]
    targets = [[rng.randrange(1, 97) for _ in range(rng.randint(1, 12))] for _ in range(5)]
    # The plain way: right-padded rows, labels on the targets, the model's own loss over all logits.
    width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    ids = torch.zeros(5, width, dtype=torch.long)
    labels = torch.full((5, width), -100)
    mask = torch.zeros(5, width, dtype=torch.long)
    for i, (p, t) in enumerate(zip(prompts, targets, strict=True)):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        labels[i, len(p) : len(p) + len(t)] = torch.tensor(t)
        mask[i, : len(p) + len(t)] = 1
    full = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    full.backward()
    full_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits, lab, loss_mask, n = response_logits(model, prompts, targets)
    lean = sft_loss(logits, lab, loss_mask)
    lean.backward()
    assert logits.shape == (5, max(map(len, targets)) + 1, 97)  # not [5, width, 97]
    assert n == sum(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
    torch.testing.assert_close(lean, full)
    for a, p in zip(full_grads, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_an_init_that_is_not_a_causal_lm_is_refused_before_anything_is_written(dataset, tmp_path):
    enc = tmp_path / "encoder"
    enc.mkdir()
    (enc / "config.json").write_text(json.dumps({"model_type": "t5", "architectures": ["T5EncoderModel"]}))
    (enc / "model.safetensors").write_bytes(b"")
    out = tmp_path / "run"
    with pytest.raises(CheckpointError, match="is not a causal language model"):
        train(TrainConfig(dataset=dataset, out_dir=str(out), stage="sft", init=str(enc), **REAL))
    assert not out.exists()
