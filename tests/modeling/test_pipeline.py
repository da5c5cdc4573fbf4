"""The paper-table pipeline on a tiny budget: stages train in order, arms are evaluated, reruns skip."""

from __future__ import annotations

import json

import pytest

from modeling.pipeline import PipelineConfig, arms, run_pipeline, stages

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 400}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from modeling.synth import generate_dataset

    out = tmp_path_factory.mktemp("ds") / "elix"
    return str(generate_dataset(out_dir=out, domain="elix", users=200, pairs_per_user=8, seed=0).path)


def config(dataset, out, **kw):
    base = dict(
        dataset=dataset,
        out_dir=str(out),
        only=("pref-ft", "fspo"),
        shots=(1, 2),
        batch_size=2,
        steps={"pretrain": 6, "sft": 4, "ipo": 3},
        tiny=TINY,
        eval_episodes=6,
        eval_shots=2,
        shot_sweep=(0, 2),
        max_new_tokens=12,
    )
    return PipelineConfig(**{**base, **kw})


def test_a_subset_of_stages_brings_the_stages_it_starts_from(dataset, tmp_path):
    pc = config(dataset, tmp_path)
    assert [name for name, _ in stages(pc)] == ["base", "pref-ft", "fspo"]
    assert [a.name for a in arms(pc)] == [
        "base (no context)",
        "few-shot prompting",
        "few-shot Pref-FT",
        "FSPO",
    ]
    with pytest.raises(ValueError, match="unknown stage"):
        stages(config(dataset, tmp_path, only=("fspo", "nonsense")))


def test_a_pretrained_base_model_is_the_base_every_stage_starts_from_and_the_baseline(
    dataset, tiny_model_dir, tmp_path
):
    pc = config(dataset, tmp_path, base_model=str(tiny_model_dir), lora=True, lora_r=4, max_target_tokens=32)
    plan = dict(stages(pc))
    assert list(plan) == ["pref-ft", "fspo"]  # nothing is pretrained
    assert plan["pref-ft"].init == str(tiny_model_dir.resolve())
    assert plan["fspo"].init == str(tmp_path / "pref-ft")
    assert all(c.lora and c.lora_r == 4 and c.max_target_tokens == 32 for c in plan.values())
    models = {a.name: a.model for a in arms(pc)}
    assert models["base (no context)"] == models["few-shot prompting"] == str(tiny_model_dir.resolve())
    assert models["FSPO"] == str(tmp_path / "fspo")
    with pytest.raises(ValueError, match="is not a model directory"):
        config(dataset, tmp_path, base_model=str(tmp_path / "missing"))


def test_the_pipeline_trains_evaluates_and_skips_finished_stages_on_a_rerun(dataset, tmp_path):
    pc = config(dataset, tmp_path)
    result = run_pipeline(pc)
    names = [r["arm"] for r in result.table]
    assert names == ["base (no context)", "few-shot prompting", "few-shot Pref-FT", "FSPO"]
    assert all(0 <= r["win_rate"] <= 1 and r["n"] == 6 for r in result.table)
    assert [r["shots"] for r in result.shot_sweep] == [0, 2]
    # FSPO judged directly against every other arm but the baseline.
    assert [(r["arm"], r["vs"]) for r in result.head_to_head] == [
        ("FSPO", "few-shot prompting"),
        ("FSPO", "few-shot Pref-FT"),
    ]
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert [r["arm"] for r in saved["table"]] == names
    assert (tmp_path / "eval" / "win_rates.png").is_file() and (
        tmp_path / "eval" / "shot_sweep.png"
    ).is_file()
    # The FSPO stage starts from Pref-FT, which is its frozen reference.
    manifest = json.loads((tmp_path / "fspo" / "fspo.json").read_text())
    assert manifest["init_stage"] == "sft" and manifest["config"]["freeze_embeddings"] is True

    # A checkpoint trained before a TrainConfig field existed counts as trained with its default...
    config_of_base = tmp_path / "base" / "fspo.json"
    base_manifest = json.loads(config_of_base.read_text())
    del base_manifest["config"]["cot_nll"]
    config_of_base.write_text(json.dumps(base_manifest))
    # ...and one trained with another value of a field is trained again.
    manifest["config"]["lr"] *= 2
    (tmp_path / "fspo" / "fspo.json").write_text(json.dumps(manifest))

    logged: list[str] = []
    run_pipeline(pc, log=logged.append)
    assert logged[:2] == [
        "[1/3] base: already trained, skipped",
        "[2/3] pref-ft: already trained, skipped",
    ]
    assert logged[2].startswith("[3/3] fspo: held-out loss")


def test_ptx_weights_go_to_their_stage_kind_with_the_bases_document_mix(dataset, tmp_path):
    pc = config(dataset, tmp_path)  # the recipe's weights
    by_name = dict(stages(pc))
    assert by_name["base"].ptx == 0.0
    assert by_name["pref-ft"].ptx == 1.0 and by_name["fspo"].ptx == 100.0
    for name in ("pref-ft", "fspo"):  # the ptx documents are drawn as the base's were
        assert by_name[name].pretrain_consistent == pc.pretrain_consistent
        assert by_name[name].pretrain_quoted == pc.pretrain_quoted
    plain = dict(stages(config(dataset, tmp_path, ptx={})))
    assert plain["fspo"].ptx == 0.0 and plain["fspo"].pretrain_consistent == 0.0
    with pytest.raises(ValueError, match="per fine-tuning stage kind"):
        config(dataset, tmp_path, ptx={"pretrain": 1.0})


def test_the_cot_pref_ft_has_its_own_budget_and_learns_the_description_words(dataset, tmp_path):
    budgets = {
        "steps": {"pretrain": 6, "sft": 4, "sft-cot": 8, "ipo": 3},
        "lr": {"pretrain": 3e-3, "sft": 3e-4, "sft-cot": 1e-3, "ipo": 5e-4},
    }
    by_name = dict(stages(config(dataset, tmp_path, only=None, **budgets)))
    cot_sft, plain_sft = by_name["pref-ft-cot"], by_name["pref-ft"]
    assert (cot_sft.steps, cot_sft.lr, cot_sft.freeze_embeddings) == (8, 1e-3, False)
    assert (plain_sft.steps, plain_sft.lr, plain_sft.freeze_embeddings) == (4, 3e-4, True)
    # IPO on top of it, and the oracle's Pref-FT (it reads a description, never writes one), keep
    # the embeddings fixed and the shared budgets.
    assert (by_name["fspo-cot"].steps, by_name["fspo-cot"].freeze_embeddings) == (3, True)
    # ...and that IPO keeps writing descriptions with the CoT NLL term; no other stage has one.
    assert by_name["fspo-cot"].cot_nll == 100.0
    assert all(c.cot_nll == 0.0 for name, c in by_name.items() if name != "fspo-cot")
    assert (by_name["oracle-sft"].steps, by_name["oracle-sft"].freeze_embeddings) == (4, True)
    # Each of steps and lr without an sft-cot entry gives the CoT Pref-FT its sft value.
    shared = dict(stages(config(dataset, tmp_path, only=("pref-ft-cot",))))["pref-ft-cot"]
    assert (shared.steps, shared.lr) == (4, PipelineConfig(dataset, "x").lr["sft-cot"])
    lr = {"pretrain": 3e-3, "sft": 2e-4, "ipo": 5e-4}
    assert dict(stages(config(dataset, tmp_path, only=("pref-ft-cot",), lr=lr)))["pref-ft-cot"].lr == 2e-4
    with pytest.raises(ValueError, match=r"missing \['ipo'\]"):
        config(dataset, tmp_path, steps={"pretrain": 6, "sft": 4})
    with pytest.raises(ValueError, match=r"unknown \['dpo'\]"):
        config(dataset, tmp_path, lr={"pretrain": 1e-3, "sft": 1e-3, "ipo": 1e-3, "dpo": 1e-3})


def test_the_base_documents_shot_range_defaults_to_the_fine_tuning_stages_and_can_be_set(dataset, tmp_path):
    by_name = dict(stages(config(dataset, tmp_path, shots=(1, 8))))
    assert by_name["base"].shots == (0, 8) and by_name["fspo"].shots == (1, 8)
    by_name = dict(stages(config(dataset, tmp_path, shots=(1, 8), pretrain_shots=4)))
    assert by_name["base"].shots == (0, 4)
    assert by_name["pref-ft"].shots == (1, 8) and by_name["fspo"].shots == (1, 8)
    with pytest.raises(ValueError, match="pretrain_shots must be 0 or more"):
        config(dataset, tmp_path, pretrain_shots=-1)


def test_several_targets_per_episode_go_to_every_ipo_stage_and_nothing_else(dataset, tmp_path):
    by_name = dict(stages(config(dataset, tmp_path, ipo_targets=4, only=None)))
    ipo = {name for name, c in by_name.items() if c.stage == "ipo"}
    assert ipo >= {"fspo", "ipo-aggregate", "oracle", "fspo-cot"}
    assert {name: c.targets_per_episode for name, c in by_name.items()} == {
        name: 4 if name in ipo else 1 for name in by_name
    }
    assert all(c.targets_per_episode == 1 for _, c in stages(config(dataset, tmp_path, only=None)))
    with pytest.raises(ValueError, match="ipo_targets must be 1 or more"):
        config(dataset, tmp_path, ipo_targets=0)
