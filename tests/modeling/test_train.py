"""FSPO training on a tiny model from scratch: stages lower the held-out loss, resume, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from modeling.train import CheckpointError, TrainConfig, load_checkpoint_manifest, load_model, train

TINY = {"hidden_size": 48, "num_layers": 2, "num_heads": 4, "intermediate_size": 96, "vocab_size": 400}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from modeling.synth import generate_dataset

    return str(
        generate_dataset(
            out_dir=tmp_path_factory.mktemp("ds") / "elix",
            domain="elix",
            users=300,
            pairs_per_user=10,
            seed=0,
        ).path
    )


def cfg(dataset, out, **kw):
    base = dict(
        dataset=dataset,
        out_dir=str(out),
        tiny=TINY,
        batch_size=4,
        shots=(0, 2),
        eval_every=10,
        save_every=10,
        eval_episodes=8,
        lr=3e-3,
        warmup_steps=5,
        max_prompt_tokens=1024,
    )
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def base_model(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base"
    train(cfg(dataset, out, stage="pretrain", steps=40))
    return out


def test_pretraining_from_scratch_lowers_the_held_out_loss(base_model):
    manifest = load_checkpoint_manifest(base_model)
    history = manifest["metrics"]["history"]
    assert history[-1]["eval_loss"] < 0.8 * history[0]["eval_loss"]
    assert manifest["stage"] == "pretrain" and manifest["domain"] == "elix"
    assert manifest["prompt_format_version"] == "fspo-markdown-1"
    model, tok = load_model(base_model)
    assert model.config.hidden_size == 48 and len(tok) <= 400
    assert not (base_model / "checkpoint-last").exists()


def test_pref_ft_lowers_the_held_out_loss_of_preferred_responses(base_model, dataset, tmp_path):
    result = train(cfg(dataset, tmp_path / "sft", stage="sft", init=str(base_model), steps=20, lr=1e-3))
    history = result.metrics["history"]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert load_checkpoint_manifest(tmp_path / "sft")["init_stage"] == "pretrain"


def test_shot_targets_supervise_each_shots_preferred_response_and_nothing_else(base_model, dataset):
    from modeling.data import EpisodeSource
    from modeling.train import tokenize_episode

    _, tok = load_model(base_model)
    episode = EpisodeSource(dataset, split="train").sample(1, shots=2, seed=3)[0]
    plain = tokenize_episode(tok, episode, cfg(dataset, "unused", stage="sft", init="unused"))
    dense = tokenize_episode(
        tok, episode, cfg(dataset, "unused", stage="sft", init="unused", shot_targets=True)
    )
    assert plain.prompt_labels is None and dense.prompt == plain.prompt
    supervised = [t for t in dense.prompt_labels if t != -100]
    assert tok.decode(supervised) == "".join(s.chosen for s in episode.shots)
    ipo = tokenize_episode(
        tok, episode, cfg(dataset, "unused", stage="ipo", init="unused", shot_targets=True)
    )
    assert ipo.prompt_labels is None  # IPO's pairs are the final target's only


def test_frozen_embeddings_stay_bit_identical_while_the_rest_trains(base_model, dataset, tmp_path):
    train(cfg(dataset, tmp_path / "sft", stage="sft", init=str(base_model), steps=5, freeze_embeddings=True))
    before, _ = load_model(base_model)
    after, _ = load_model(tmp_path / "sft")
    assert torch.equal(before.get_input_embeddings().weight, after.get_input_embeddings().weight)
    assert not torch.equal(
        before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    )


def test_a_killed_run_resumes_from_its_last_checkpoint_to_the_same_weights(base_model, dataset, tmp_path):
    c = cfg(dataset, tmp_path / "a", stage="sft", init=str(base_model), steps=25)

    def kill_at_15(done, total, stage):
        if done == 15:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(c, progress=kill_at_15)
    state = torch.load(tmp_path / "a" / "checkpoint-last" / "trainer_state.pt", weights_only=False)
    assert state["step"] == 10
    assert not (tmp_path / "a" / "fspo.json").exists()  # nothing looks finished
    with pytest.raises(CheckpointError, match="not an fspo checkpoint"):
        load_checkpoint_manifest(tmp_path / "a")
    resumed = train(c)
    straight = train(cfg(dataset, tmp_path / "b", stage="sft", init=str(base_model), steps=25))
    a, _ = load_model(resumed.out_dir)
    b, _ = load_model(straight.out_dir)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.allclose(pa, pb, atol=1e-6), name
    assert [h["step"] for h in resumed.metrics["history"]] == [h["step"] for h in straight.metrics["history"]]


def test_resuming_with_another_config_is_refused(base_model, dataset, tmp_path):
    c = cfg(dataset, tmp_path / "a", stage="sft", init=str(base_model), steps=12)

    def kill(done, total, stage):
        if done == 11:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(c, progress=kill)
    with pytest.raises(CheckpointError, match="written with another config"):
        train(cfg(dataset, tmp_path / "a", stage="sft", init=str(base_model), steps=12, lr=5e-4))
    # A checkpoint written before a field existed (its manifest lacks it) trained with that field's
    # default: it resumes under the same config.
    manifest = tmp_path / "a" / "checkpoint-last" / "fspo.json"
    data = json.loads(manifest.read_text())
    del data["config"]["cot_nll"]
    manifest.write_text(json.dumps(data))
    resumed = train(c)
    assert [h["step"] for h in resumed.metrics["history"]][-1] == 12


def test_bad_checkpoints_and_configs_get_clear_errors(base_model, dataset, tmp_path):
    with pytest.raises(CheckpointError, match="no such model directory"):
        train(cfg(dataset, tmp_path / "x", stage="sft", init=str(tmp_path / "missing"), steps=2))
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint_manifest(tmp_path / "missing")
    other = tmp_path / "other"
    other.mkdir()
    (other / "fspo.json").write_text(json.dumps({"prompt_format_version": "chatml-0"}))
    with pytest.raises(
        CheckpointError, match="prompt format 'chatml-0' does not match this code's 'fspo-markdown-1'"
    ):
        load_checkpoint_manifest(other)
    with pytest.raises(ValueError, match="stage 'ipo' needs init"):
        TrainConfig(dataset=dataset, out_dir=str(tmp_path), stage="ipo")
    with pytest.raises(ValueError, match="shots must be a range"):
        TrainConfig(dataset=dataset, out_dir=str(tmp_path), stage="pretrain", shots=(3, 1))


# IPO on one repeated batch, from the reference: the loss starts at (0 - 1/(2*0.1))^2 = 25 and drops.
OVERFIT_IPO = dict(stage="ipo", steps=30, lr=3e-4, beta=0.1, overfit_batches=1, eval_every=15, warmup_steps=2)


def test_ipo_starts_at_the_reference_and_fits_its_pairs(base_model, dataset, tmp_path):
    """The second FSPO stage: IPO initialised from Pref-FT, with Pref-FT as the frozen reference.

    On the tiny test budget held-out preference gains are noise, so this checks the mechanics: at step 0
    the policy equals the precomputed reference (h = 0, IPO loss (0 - 1/(2*0.1))^2 = 25 on held-out
    pairs), and on a repeated batch IPO drives h to its target 1/(2 beta)."""
    sft = train(cfg(dataset, tmp_path / "sft", stage="sft", init=str(base_model), steps=10, lr=1e-3))
    ipo = train(
        cfg(
            dataset,
            tmp_path / "ipo",
            init=str(sft.out_dir),
            **OVERFIT_IPO,
        )
    )
    history = ipo.metrics["history"]
    assert history[0]["eval_loss"] == pytest.approx(25.0, abs=1e-3)
    assert history[0]["eval_pref_accuracy"] == 0.0  # h = 0 exactly: not yet above the reference
    assert history[-1]["loss"] < 5.0  # started at 25 on this batch
    assert history[-1]["pref_accuracy"] == 1.0
    assert history[-1]["reward_margin"] > 0
    manifest = load_checkpoint_manifest(ipo.out_dir)
    assert manifest["stage"] == "ipo" and manifest["init_stage"] == "sft"


def test_ipo_with_several_targets_per_episode_fits_them_behind_shared_shots(base_model, dataset, tmp_path):
    """targets_per_episode 3: each of the batch's 4 users brings up to 3 held-out pairs behind one set of
    shots, all scored in the user's one packed row; the mechanics of the IPO test above hold for all."""
    ipo = train(
        cfg(
            dataset,
            tmp_path / "ipo",
            init=str(base_model),
            shots=(1, 2),
            targets_per_episode=3,
            **OVERFIT_IPO,
        )
    )
    history = ipo.metrics["history"]
    assert history[0]["eval_loss"] == pytest.approx(25.0, abs=1e-3)  # policy = reference at step 0
    assert 4 < history[-1]["pairs"] <= 12  # more pairs than episodes in the step
    assert history[-1]["loss"] < 5.0
    assert history[-1]["pref_accuracy"] == 1.0
    manifest = load_checkpoint_manifest(ipo.out_dir)
    assert manifest["config"]["targets_per_episode"] == 3
    with pytest.raises(ValueError, match="targets_per_episode > 1 is for a preference stage"):
        cfg(dataset, tmp_path / "out", stage="sft", init="x", targets_per_episode=2)
    with pytest.raises(ValueError, match="targets_per_episode must be >= 1"):
        cfg(dataset, tmp_path / "out", stage="ipo", init="x", targets_per_episode=0)


def test_a_consistent_authors_document_keeps_one_style_and_carries_no_label(dataset):
    """Pretraining's one-author documents: every response (both of each shot's, and the target) answers
    its own question in one style, so the labels say nothing; the plain documents mix styles."""
    import random

    from modeling.data import EpisodeSource
    from modeling.synth import load_dataset
    from modeling.train import consistent_document, pretrain_episode

    src = EpisodeSource(dataset, split="train", all_questions=True)
    assert src.styled_answers is not None
    style_of = {text: style for answers in src.styled_answers.values() for text, style in answers}
    questions = load_dataset(dataset).table("questions", ["text"]).column("text").to_pylist()
    answers_to = {q: {t for t, _ in src.styled_answers[i]} for i, q in enumerate(questions)}
    rng = random.Random(0)
    mixed = in_style = 0
    for ep in src.sample(40, shots=4, seed=1):
        doc = consistent_document(ep, rng, src)
        # The style is drawn from the target question's answers, so both target responses share it;
        # each shot's question answered in that style (most are) is answered in it.
        style = style_of[doc.chosen]
        assert style_of[doc.rejected] == style
        for s in doc.shots:
            assert {s.chosen, s.rejected} <= answers_to[s.question]
            if style in {style_of[t] for t in answers_to[s.question]}:
                assert style_of[s.chosen] == style_of[s.rejected] == style
                in_style += 1
        assert {doc.chosen, doc.rejected} <= answers_to[doc.question]
        plain = pretrain_episode(ep, rng, src, consistent=0.0)
        mixed += len({style_of[t] for s in plain.shots for t in (s.chosen, s.rejected)}) > 1
    assert in_style >= 100  # of 160 shots
    assert mixed >= 30  # without the option, styles in a document are independent


def test_a_quoted_document_puts_the_authors_answer_first_and_another_style_second(dataset):
    """Quoted one-author documents: each shot's preferred slot holds the author's style (the target's),
    the dispreferred slot another writer's answer to the same question in another style."""
    import random

    from modeling.data import EpisodeSource
    from modeling.train import consistent_document, pretrain_episode

    src = EpisodeSource(dataset, split="train", all_questions=True)
    assert src.styled_answers is not None
    style_of = {text: style for answers in src.styled_answers.values() for text, style in answers}
    rng = random.Random(0)
    checked = 0
    for ep in src.sample(40, shots=4, seed=2):
        doc = consistent_document(ep, rng, src, quoted=True)
        style = style_of[doc.chosen]
        for s in doc.shots:
            answers = src.styled_answers[src.question_ids[s.question]]
            assert s.chosen in {t for t, _ in answers} and s.rejected in {t for t, _ in answers}
            assert style_of[s.rejected] != style_of[s.chosen]
            if style in {st for _, st in answers}:
                assert style_of[s.chosen] == style
                checked += 1
    assert checked >= 100
    # The fraction is honoured: quoted=1 quotes every one-author document, quoted=0 none.
    eps = src.sample(30, shots=3, seed=3)
    always = [pretrain_episode(e, rng, src, consistent=1.0, quoted=1.0) for e in eps]
    never = [pretrain_episode(e, rng, src, consistent=1.0, quoted=0.0) for e in eps]
    assert all(style_of[s.chosen] != style_of[s.rejected] for d in always for s in d.shots)
    assert sum(style_of[s.chosen] == style_of[s.rejected] for d in never for s in d.shots) >= 60


def test_consistent_pretraining_needs_a_dataset_that_records_styles(base_model, dataset, tmp_path):
    import shutil

    import pyarrow.parquet as pq

    copy = tmp_path / "elix"
    shutil.copytree(dataset, copy)
    responses = pq.read_table(copy / "responses.parquet")
    pq.write_table(
        responses.drop([c for c in responses.column_names if c.startswith("trait_")]),
        copy / "responses.parquet",
    )
    with pytest.raises(ValueError, match="pretrain_consistent needs each response's trait values"):
        train(cfg(str(copy), tmp_path / "out", stage="pretrain", steps=2, pretrain_consistent=0.5))
    with pytest.raises(ValueError, match="pretrain_consistent needs each response's trait values"):
        train(
            cfg(
                str(copy),
                tmp_path / "ptx",
                stage="ipo",
                init=str(base_model),
                ptx=1.0,
                pretrain_consistent=0.5,
            )
        )
    with pytest.raises(ValueError, match="pretrain_consistent must be a fraction"):
        cfg(dataset, tmp_path / "out", stage="pretrain", pretrain_consistent=1.5)
    with pytest.raises(ValueError, match="pretrain_quoted must be a fraction"):
        cfg(dataset, tmp_path / "out", stage="pretrain", pretrain_quoted=-0.1)


def _document_loss(model_dir, dataset, c):
    """The language-modelling loss of a checkpoint on base-model documents no training step drew."""
    from modeling.data import EpisodeSource
    from modeling.train import _examples, _ptx_config, _sft_loss

    model, tok = load_model(model_dir)
    model.eval()
    src = EpisodeSource(dataset, split="train", all_questions=True)
    pc = _ptx_config(c)
    with torch.no_grad():
        return sum(float(_sft_loss(model, _examples(src, tok, pc, 10_000 + s), pc, 0)[0]) for s in range(4))


def test_ptx_keeps_the_base_models_documents_while_ipo_pulls_away(base_model, dataset, tmp_path):
    kw = dict(stage="ipo", init=str(base_model), steps=20, lr=3e-3, beta=0.01, eval_every=20, save_every=20)
    kw.update(pretrain_consistent=0.8, pretrain_quoted=0.5)
    plain = train(cfg(dataset, tmp_path / "plain", **kw))
    mixed_cfg = cfg(dataset, tmp_path / "mixed", ptx=100.0, **kw)
    mixed = train(mixed_cfg)
    assert "ptx_loss" in mixed.metrics["final"] and "ptx_loss" not in plain.metrics["final"]
    before = _document_loss(base_model, dataset, mixed_cfg)
    after_plain = _document_loss(tmp_path / "plain", dataset, mixed_cfg)
    after_mixed = _document_loss(tmp_path / "mixed", dataset, mixed_cfg)
    assert after_plain > before  # IPO alone wears the base's language away...
    assert after_mixed < after_plain  # ...and the ptx term holds it


def test_ptx_is_for_fine_tuning_stages_and_must_be_a_weight(dataset, tmp_path):
    with pytest.raises(ValueError, match="pretrain is one already"):
        cfg(dataset, tmp_path / "out", stage="pretrain", ptx=0.5)
    with pytest.raises(ValueError, match="ptx must be a weight >= 0"):
        cfg(dataset, tmp_path / "out", stage="ipo", init="x", ptx=-1.0)


def _cot_loss(model_dir, dataset, c):
    """The CoT Pref-FT loss (true description, then chosen response) on batches no step drew."""
    from modeling.data import EpisodeSource
    from modeling.train import _examples, _sft_loss

    model, tok = load_model(model_dir)
    model.eval()
    src = EpisodeSource(dataset, split="train")
    sft = dataclasses.replace(c, stage="sft", cot_nll=0.0, ptx=0.0)
    with torch.no_grad():
        return sum(float(_sft_loss(model, _examples(src, tok, sft, 10_000 + s), sft, 0)[0]) for s in range(4))


def test_cot_nll_keeps_a_cot_ipo_writing_descriptions(base_model, dataset, tmp_path):
    cot_sft = tmp_path / "cot-sft"
    train(cfg(dataset, cot_sft, stage="sft", init=str(base_model), cot=True, steps=20))
    kw = dict(stage="ipo", cot=True, init=str(cot_sft), steps=20, lr=3e-3, beta=0.1, eval_every=20)
    plain = train(cfg(dataset, tmp_path / "plain", save_every=20, **kw))
    mixed_cfg = cfg(dataset, tmp_path / "mixed", save_every=20, cot_nll=100.0, **kw)
    mixed = train(mixed_cfg)
    assert "cot_nll" in mixed.metrics["final"] and "cot_nll" not in plain.metrics["final"]
    before = _cot_loss(cot_sft, dataset, mixed_cfg)
    after_plain = _cot_loss(tmp_path / "plain", dataset, mixed_cfg)
    after_mixed = _cot_loss(tmp_path / "mixed", dataset, mixed_cfg)
    assert after_plain > before  # IPO with the description in its prompt unlearns writing one...
    assert after_mixed < after_plain  # ...and the CoT NLL term keeps it


def test_cot_nll_is_for_cot_preference_stages_and_must_be_a_weight(dataset, tmp_path):
    for bad in (dict(stage="ipo", cot=False), dict(stage="sft", cot=True)):
        with pytest.raises(ValueError, match="cot_nll is for a CoT preference stage"):
            cfg(dataset, tmp_path / "out", init="x", cot_nll=1.0, **bad)
    with pytest.raises(ValueError, match="cot_nll must be a weight >= 0"):
        cfg(dataset, tmp_path / "out", stage="ipo", cot=True, init="x", cot_nll=-1.0)
