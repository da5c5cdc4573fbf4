"""Tests for modeling/losses.py.

Loss values and gradients are checked against numbers worked out by hand (torchtune style); the pair
scorers run real tiny Llama models; the IPO loss is checked against TRL's DPOTrainer on the same model.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from modeling.losses import (
    dpo_loss,
    ipo_loss,
    packed_group_logps,
    packed_pair_logps,
    separate_pair_logps,
    sequence_logps,
    sft_loss,
)
from modeling.tinymodel import tiny_llama as build_tiny_llama

LN3 = math.log(3.0)


def tiny_llama(
    *,
    vocab_size: int = 128,
    attn_implementation: str = "sdpa",
    initializer_range: float = 0.3,
    seed: int = 0,
    **config: Any,
) -> LlamaForCausalLM:
    """The one tiny builder's Llama (``modeling.tinymodel.tiny_llama``), smaller and with grouped-query
    attention (4 query heads over 2 key/value heads), untied embeddings and no tokenizer, seeded on a
    private RNG stream.

    ``initializer_range`` well above Llama's 0.02 makes predictions depend strongly on the context, so
    a token that attends to the wrong thing moves its log-prob far beyond the tolerances used here.
    """
    return build_tiny_llama(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        tie_word_embeddings=False,
        initializer_range=initializer_range,
        attn_implementation=attn_implementation,
        seed=seed,
        **config,
    )


# Three pairs with different (prompt, chosen, rejected) lengths: (7, 3, 5), (4, 6, 2), (9, 1, 1).
# Token 0 (the pad id) appears inside a response on purpose: padding must come from lengths, not ids.
PROMPTS = [[5, 17, 99, 3, 42, 8, 61], [12, 7, 88, 30], [101, 2, 9, 77, 15, 64, 23, 50, 4]]
CHOSEN = [[11, 0, 45], [70, 71, 72, 73, 74, 75], [33]]
REJECTED = [[90, 91, 14, 6, 27], [120, 1], [58]]


# ------------------------------------------------------------------------------------------ sequence_logps

# One sequence of 3 tokens over a 2-token vocabulary. Logits at position t predict token t + 1:
#   position 0: [0, 0]     -> p = (1/2, 1/2), predicts labels[1] = 1: log 1/2
#   position 1: [ln 3, 0]  -> p = (3/4, 1/4), predicts labels[2] = 0: log 3/4
#   position 2: [9, -9]    -> predicts past the end, never used
LOGITS = torch.tensor([[[0.0, 0.0], [LN3, 0.0], [9.0, -9.0]]])
LABELS = torch.tensor([[1, 1, 0]])


def test_sequence_logps_sums_the_log_probs_of_the_masked_next_tokens() -> None:
    logps = sequence_logps(LOGITS, LABELS, torch.tensor([[0, 1, 1]]))

    torch.testing.assert_close(logps, torch.tensor([math.log(1 / 2) + math.log(3 / 4)]))  # log 3/8 = -0.98083


def test_sequence_logps_averages_over_the_masked_tokens_when_asked() -> None:
    logps = sequence_logps(LOGITS, LABELS, torch.tensor([[0, 1, 1]]), average=True)

    torch.testing.assert_close(logps, torch.tensor([math.log(3 / 8) / 2]))


def test_sequence_logps_leaves_out_unmasked_tokens_whatever_their_ids() -> None:
    other_labels = torch.tensor([[1, 0, 0]])  # differs only at position 1, which the mask leaves out

    logps = sequence_logps(LOGITS, other_labels, torch.tensor([[0, 0, 1]]))
    mean = sequence_logps(LOGITS, other_labels, torch.tensor([[0, 0, 1]]), average=True)

    torch.testing.assert_close(logps, torch.tensor([math.log(3 / 4)]))
    torch.testing.assert_close(mean, torch.tensor([math.log(3 / 4)]))


def test_sequence_logps_refuses_a_mask_on_the_first_token() -> None:
    with pytest.raises(ValueError, match="first token"):
        sequence_logps(LOGITS, LABELS, torch.tensor([[1, 1, 1]]))


# ------------------------------------------------------------------------------------------------ sft_loss


def test_sft_loss_averages_the_nll_over_every_target_token_in_the_batch() -> None:
    # Row 0 as above scores log 1/2 and log 3/4; row 1 has uniform logits and scores one token, log 1/2.
    logits = torch.cat([LOGITS, torch.zeros(1, 3, 2)])
    labels = torch.tensor([[1, 1, 0], [0, 0, 1]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])

    loss = sft_loss(logits, labels, mask)

    token_mean = -(math.log(1 / 2) + math.log(3 / 4) + math.log(1 / 2)) / 3  # = -log(3/16)/3 = 0.55799
    mean_of_row_means = -(math.log(3 / 8) / 2 + math.log(1 / 2)) / 2  # = 0.59176, not what Pref-FT uses
    torch.testing.assert_close(loss, torch.tensor(token_mean))
    assert abs(loss.item() - mean_of_row_means) > 1e-2


# ------------------------------------------------------------------------------------- ipo_loss, dpo_loss

BETA = 0.1  # 1 / (2β) = 5
# pair 0: h = (-10 - -12) - (-11 - -11.5) = 2 - 0.5 = 1.5
# pair 1: h = (-5 - -5) - (-6 - -2)       = 0 - -4  = 4
POLICY_CHOSEN = [-10.0, -5.0]
POLICY_REJECTED = [-12.0, -5.0]
REF_CHOSEN = torch.tensor([-11.0, -6.0])
REF_REJECTED = torch.tensor([-11.5, -2.0])


def policy_logps() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor(POLICY_CHOSEN, requires_grad=True), torch.tensor(POLICY_REJECTED, requires_grad=True)


def test_ipo_loss_is_the_squared_distance_of_h_from_one_over_two_beta() -> None:
    chosen, rejected = policy_logps()

    loss, chosen_rewards, rejected_rewards = ipo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, BETA)

    torch.testing.assert_close(loss, torch.tensor([(1.5 - 5) ** 2, (4 - 5) ** 2]))  # [12.25, 1.0]
    # rewards = β (log π − log π_ref): pair 0: 0.1·1, 0.1·-0.5; pair 1: 0.1·1, 0.1·-3
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.1]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.05, -0.3]))
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_ipo_loss_gradient_is_twice_the_distance_from_the_target() -> None:
    chosen, rejected = policy_logps()

    loss, _, _ = ipo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, BETA)
    loss.sum().backward()

    # d/dπ_c (h − 5)² = 2(h − 5): pair 0: 2·(1.5 − 5) = -7; pair 1: 2·(4 − 5) = -2. d/dπ_r is the opposite.
    torch.testing.assert_close(chosen.grad, torch.tensor([-7.0, -2.0]))
    torch.testing.assert_close(rejected.grad, torch.tensor([7.0, 2.0]))


def test_dpo_loss_is_minus_log_sigmoid_of_beta_h() -> None:
    chosen, rejected = policy_logps()

    loss, chosen_rewards, _ = dpo_loss(chosen, rejected, REF_CHOSEN, REF_REJECTED, BETA)
    loss.sum().backward()

    # −log σ(x) = log(1 + e^−x): pair 0 x = 0.15 -> 0.620957; pair 1 x = 0.4 -> 0.513015
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-0.15)), math.log1p(math.exp(-0.4))]))
    # d/dπ_c = −β σ(−βh) = −0.1 / (1 + e^{βh}): pair 0 -0.046257; pair 1 -0.040131
    expected = torch.tensor([-0.1 / (1 + math.exp(0.15)), -0.1 / (1 + math.exp(0.4))])
    torch.testing.assert_close(chosen.grad, expected)
    torch.testing.assert_close(rejected.grad, -expected)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, 0.1]))


@pytest.mark.parametrize("loss_fn", [ipo_loss, dpo_loss])
def test_preference_losses_refuse_a_non_positive_beta(loss_fn) -> None:
    chosen, rejected = policy_logps()
    with pytest.raises(ValueError, match="beta"):
        loss_fn(chosen, rejected, REF_CHOSEN, REF_REJECTED, 0.0)


# ------------------------------------------------------------------------- packed vs separate pair scoring


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_pair_logps_equal_separate_pair_logps(attn_implementation: str, average: bool) -> None:
    model = tiny_llama(attn_implementation=attn_implementation)

    with torch.no_grad():
        packed_chosen, packed_rejected, _ = packed_pair_logps(
            model, PROMPTS, CHOSEN, REJECTED, average=average
        )
        chosen, rejected, _ = separate_pair_logps(model, PROMPTS, CHOSEN, REJECTED, average=average)

    torch.testing.assert_close(packed_chosen, chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_rejected, rejected, rtol=0, atol=1e-5)


def test_packed_rejected_logps_do_not_depend_on_the_chosen_response() -> None:
    model = tiny_llama()
    other_chosen = [[c + 1 for c in chosen] + [7, 7] for chosen in CHOSEN]  # other ids, and longer

    with torch.no_grad():
        _, rejected, _ = packed_pair_logps(model, PROMPTS, CHOSEN, REJECTED)
        _, rejected_other, _ = packed_pair_logps(model, PROMPTS, other_chosen, REJECTED)

    torch.testing.assert_close(rejected_other, rejected, rtol=0, atol=1e-5)


def test_packed_pair_logps_give_the_same_ipo_gradients_as_separate_pair_logps() -> None:
    """Gradients agree to float32 rounding (max difference here ~1e-6).

    Why not exactly, even in float64: Llama's RMSNorm runs in float32 whatever the model's dtype, and in
    the packed row a prompt token's gradient is the sum of both branches' before it goes through that
    norm, whereas separately each copy of the prompt gets one branch's. The model is set up with
    gradients of order 1 (Llama-like init, β = 1, policy = reference as at the first IPO step) so that
    rounding stays ~10× under the 1e-5 tolerance while a masking or gather bug (≥ 1e-2) cannot pass.
    """
    model = tiny_llama(initializer_range=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = separate_pair_logps(model, PROMPTS, CHOSEN, REJECTED)

    grads = {}
    for name, score in (("packed", packed_pair_logps), ("separate", separate_pair_logps)):
        chosen, rejected, _ = score(model, PROMPTS, CHOSEN, REJECTED)
        loss, _, _ = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=1.0)
        grads[name] = torch.autograd.grad(loss.mean(), params)

    assert len(grads["packed"]) == len(list(model.parameters()))
    for packed_grad, separate_grad in zip(grads["packed"], grads["separate"], strict=True):
        assert separate_grad.abs().max() > 1e-2
        torch.testing.assert_close(packed_grad, separate_grad, rtol=0, atol=1e-5)


def test_packed_pair_logps_run_the_model_over_fewer_tokens() -> None:
    model = tiny_llama()

    with torch.no_grad():
        *_, packed = packed_pair_logps(model, PROMPTS, CHOSEN, REJECTED)
        *_, separate = separate_pair_logps(model, PROMPTS, CHOSEN, REJECTED)

    # packed: 3 rows × max(7+3+5, 4+6+2, 9+1+1) = 3 × 15; separate: 6 rows × max(P + C, P + R) = 6 × (4+6+2)
    assert (packed, separate) == (45, 72)


def test_packed_pair_logps_refuse_an_attention_that_ignores_a_4d_mask() -> None:
    model = tiny_llama()
    model.set_attn_implementation("flex_attention")

    with pytest.raises(ValueError, match="4D mask"):
        packed_pair_logps(model, PROMPTS, CHOSEN, REJECTED)


@pytest.mark.parametrize("score", [packed_pair_logps, separate_pair_logps])
def test_pair_scorers_refuse_an_empty_prompt(score) -> None:
    with pytest.raises(ValueError, match="pair 1"):
        score(tiny_llama(), [[1, 2], []], [[3], [4]], [[5], [6]])


# ------------------------------------------------------------------- several pairs sharing a prefix

# Two groups: one user's shots (a shared prefix of 6 and of 4 tokens) and then different questions (the
# suffixes, of 3, 0 and 2 tokens: an empty one makes the prefix the whole prompt), each with a pair.
SHOTS = [[5, 17, 99, 3, 42, 8], [12, 7, 88, 30]]
GROUPS = [
    [
        (SHOTS[0] + [61, 2, 9], [4, 0, 21], [33, 34, 35, 36, 37]),
        (SHOTS[0] + [70, 71], [6], [8, 9, 10]),
        (SHOTS[0] + [61, 2, 11], [13, 14], [15]),
    ],
    [(SHOTS[1], [40, 41], [42, 43, 44]), (SHOTS[1] + [55], [56, 57, 58], [59])],
]


def _flat(groups):
    pairs = [pair for group in groups for pair in group]
    return [list(x) for x in zip(*pairs, strict=True)]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("average", [False, True])
def test_packed_group_logps_score_every_pair_as_if_alone(attn_implementation: str, average: bool) -> None:
    model = tiny_llama(attn_implementation=attn_implementation)

    with torch.no_grad():
        chosen, rejected, n_tokens = packed_group_logps(model, GROUPS, average=average)
        want_chosen, want_rejected, separate = separate_pair_logps(model, *_flat(GROUPS), average=average)

    torch.testing.assert_close(chosen, want_chosen, rtol=0, atol=1e-5)
    torch.testing.assert_close(rejected, want_rejected, rtol=0, atol=1e-5)
    # rows: 6 + (3+3+5) + (2+1+3) + (3+2+1) = 29 and 4 + (0+2+3) + (1+3+1) = 14, padded to 29; the shots
    # run once per group, against 10 rows of the longest prompt + response (6+3+5 = 14) separately.
    assert (n_tokens, separate) == (2 * 29, 10 * 14)


def test_a_pair_in_a_group_does_not_depend_on_the_others() -> None:
    model = tiny_llama()
    other = [[GROUPS[0][0], (SHOTS[0] + [90, 91, 92, 93], [1, 2, 3, 4], [5]), GROUPS[0][2]], GROUPS[1]]

    with torch.no_grad():
        chosen, rejected, _ = packed_group_logps(model, GROUPS)
        chosen_other, rejected_other, _ = packed_group_logps(model, other)

    for k in (0, 2, 3, 4):  # every pair but the one replaced
        torch.testing.assert_close(chosen_other[k], chosen[k], rtol=0, atol=1e-5)
        torch.testing.assert_close(rejected_other[k], rejected[k], rtol=0, atol=1e-5)
    assert abs(float(chosen_other[1] - chosen[1])) > 1e-2


def test_packed_group_logps_give_the_same_ipo_gradients_as_separate_pair_logps() -> None:
    """As for packed_pair_logps (same tolerance, same reason), with each shared prefix's gradient now the
    sum over all of its group's pairs."""
    model = tiny_llama(initializer_range=0.1)
    params = [p for p in model.parameters() if p.requires_grad]
    flat = _flat(GROUPS)
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = separate_pair_logps(model, *flat)

    grads = {}
    for name, score in (
        ("packed", lambda: packed_group_logps(model, GROUPS)),
        ("separate", lambda: separate_pair_logps(model, *flat)),
    ):
        chosen, rejected, _ = score()
        loss, _, _ = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=1.0)
        grads[name] = torch.autograd.grad(loss.mean(), params)

    for packed_grad, separate_grad in zip(grads["packed"], grads["separate"], strict=True):
        assert separate_grad.abs().max() > 1e-2
        torch.testing.assert_close(packed_grad, separate_grad, rtol=0, atol=1e-5)


def test_packed_group_logps_refuse_empty_groups_and_prompts_without_a_shared_prefix() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="at least one pair per group"):
        packed_group_logps(model, [GROUPS[0], []])
    with pytest.raises(ValueError, match="share no token"):
        packed_group_logps(model, [[([1, 2], [3], [4]), ([5, 2], [3], [4])]])
    with pytest.raises(ValueError, match="pair 1"):
        packed_group_logps(model, [[([1, 2], [3], [4]), ([1, 2], [], [4])]])


# ------------------------------------------------------------------------------------ parity with TRL


@pytest.fixture(scope="module")
def trl_ipo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """TRL 1.16's IPO loss and its gradients on a tiny model and one fixed batch of two pairs.

    What is called: ``DPOTrainer.compute_loss(model, inputs)`` (its public Trainer hook; it delegates to
    ``DPOTrainer._compute_loss``), with ``inputs`` made by the trainer's own ``data_collator`` from the
    trainer's own tokenized ``train_dataset``, and ``ref_model`` a frozen copy taken before the policy
    was perturbed. Nothing of TRL is reimplemented. In ``_compute_loss`` TRL scores each sequence with a
    token *sum* (``per_token_logps.sum(dim=1)``), then for ``loss_type="ipo"`` divides each log-ratio by
    its completion length before taking the margin::

        h_TRL = (π_c − ref_c) / n_c − (π_r − ref_r) / n_r,   loss = mean_pairs (h_TRL − 1/(2β))²

    which is our ipo_loss on log-probs from ``average=True``. TRL's completion is the response plus the
    EOS it appends; those same ids are what we score.
    """
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from modeling.tinymodel import train_tokenizer

    root = tmp_path_factory.mktemp("trl-ipo")
    texts = [
        "The teacher explains simple examples every day.",
        "My neighbour prefers short answers.",
        "A young chef writes about a warm bowl of soup.",
    ]
    tokenizer = train_tokenizer(texts * 5, Path(root) / "tokenizer", vocab_size=300)
    ref = tiny_llama(
        vocab_size=len(tokenizer),
        # Gradients of order 1 (with β = 1 below), so float32 rounding (~1e-7 relative) stays far under
        # the 1e-5 tolerance; see the gradient test of packed_pair_logps.
        initializer_range=0.1,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = copy.deepcopy(ref)
    # Move the policy off the reference so the log-ratios, and h, are not all zero.
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    dataset = Dataset.from_dict(
        {
            "prompt": ["The teacher explains", "My neighbour"],
            "chosen": [" simple examples every day.", " prefers short answers."],
            "rejected": [" soup.", " writes about a young chef every day."],
        }
    )
    args = DPOConfig(
        output_dir=str(root / "out"),
        loss_type="ipo",
        beta=1.0,
        bf16=False,  # DPOConfig defaults to bf16; compare in float32
        use_cpu=True,
        report_to="none",
        per_device_train_batch_size=2,
    )
    trainer = DPOTrainer(
        model=model, ref_model=ref, args=args, train_dataset=dataset, processing_class=tokenizer
    )
    examples = [trainer.train_dataset[i] for i in range(len(dataset))]
    inputs = trainer.data_collator(
        [{k: example[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for example in examples]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, inputs)
    grads = torch.autograd.grad(loss, params)
    return {
        "model": model,
        "ref": ref,
        "params": params,
        "loss": loss.detach(),
        "grads": grads,
        "prompt_ids": [e["prompt_ids"] for e in examples],
        "chosen_ids": [e["chosen_ids"] for e in examples],
        "rejected_ids": [e["rejected_ids"] for e in examples],
        "beta": args.beta,
    }


def test_ipo_loss_on_averaged_logps_matches_trl_loss_and_gradients(trl_ipo: dict) -> None:
    ids = (trl_ipo["prompt_ids"], trl_ipo["chosen_ids"], trl_ipo["rejected_ids"])
    assert len({len(c) for c in ids[1]} | {len(r) for r in ids[2]}) > 1  # lengths differ: averaging matters

    chosen, rejected, _ = packed_pair_logps(trl_ipo["model"], *ids, average=True)
    with torch.no_grad():
        ref_chosen, ref_rejected, _ = packed_pair_logps(trl_ipo["ref"], *ids, average=True)
    loss = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, trl_ipo["beta"])[0].mean()
    grads = torch.autograd.grad(loss, trl_ipo["params"])

    torch.testing.assert_close(loss.detach(), trl_ipo["loss"], rtol=1e-4, atol=0)
    for ours, theirs in zip(grads, trl_ipo["grads"], strict=True):
        assert theirs.abs().max() > 0
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_ipo_loss_on_summed_logps_differs_from_trl_by_the_length_normalisation(trl_ipo: dict) -> None:
    """FSPO sums log-probs (average=False); TRL divides each log-ratio by its completion length.

    From the per-sequence sums S and lengths n, both losses follow by hand:
    ours = mean((ΔS_c − ΔS_r − 1/(2β))²) and TRL's = mean((ΔS_c/n_c − ΔS_r/n_r − 1/(2β))²), ΔS = S_π − S_ref.
    """
    ids = (trl_ipo["prompt_ids"], trl_ipo["chosen_ids"], trl_ipo["rejected_ids"])
    target = 1 / (2 * trl_ipo["beta"])
    n_chosen = torch.tensor([len(c) for c in ids[1]], dtype=torch.float32)
    n_rejected = torch.tensor([len(r) for r in ids[2]], dtype=torch.float32)

    with torch.no_grad():
        chosen, rejected, _ = packed_pair_logps(trl_ipo["model"], *ids)
        ref_chosen, ref_rejected, _ = packed_pair_logps(trl_ipo["ref"], *ids)
        ours = ipo_loss(chosen, rejected, ref_chosen, ref_rejected, trl_ipo["beta"])[0].mean()
        # The same sums from the plain scorer, so the hand formulas do not lean on the packed one.
        s_chosen, s_rejected, _ = separate_pair_logps(trl_ipo["model"], *ids)
        s_ref_chosen, s_ref_rejected, _ = separate_pair_logps(trl_ipo["ref"], *ids)

    d_chosen, d_rejected = s_chosen - s_ref_chosen, s_rejected - s_ref_rejected
    by_hand_summed = ((d_chosen - d_rejected - target) ** 2).mean()
    by_hand_trl = ((d_chosen / n_chosen - d_rejected / n_rejected - target) ** 2).mean()
    torch.testing.assert_close(ours, by_hand_summed, rtol=1e-4, atol=0)
    torch.testing.assert_close(trl_ipo["loss"], by_hand_trl, rtol=1e-4, atol=0)
    assert abs(ours.item() - trl_ipo["loss"].item()) > 1e-2 * trl_ipo["loss"].item()
