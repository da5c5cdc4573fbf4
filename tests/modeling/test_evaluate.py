"""`fspo eval`: every arm on the same held-out episodes, judged against the baseline, with a report."""

from __future__ import annotations

import json

import pytest

from modeling.evaluate import Arm, evaluate
from modeling.llm import LLMError
from modeling.train import TrainConfig, train

TINY = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64, "vocab_size": 320}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from modeling.synth import generate_dataset

    root = tmp_path_factory.mktemp("eval")
    ds = generate_dataset(out_dir=root / "ds", domain="elix", users=200, pairs_per_user=8, seed=0).path
    base = root / "base"
    train(
        TrainConfig(
            dataset=str(ds),
            out_dir=str(base),
            stage="pretrain",
            steps=10,
            batch_size=4,
            shots=(0, 2),
            tiny=TINY,
            eval_every=10,
            eval_episodes=4,
            max_prompt_tokens=1024,
        )
    )
    return ds, base


def test_it_writes_the_comparison_table_report_and_plots(setup, tmp_path):
    ds, base = setup
    arms = [
        Arm("base", str(base), "none"),
        Arm("same-as-base", str(base), "none"),
        Arm("few-shot", str(base)),
        Arm("oracle-persona", str(base), "description"),
    ]
    result = evaluate(
        ds,
        arms,
        baseline="base",
        out_dir=tmp_path / "run",
        episodes=6,
        shots=2,
        shot_sweep=[0, 2],
        sweep_arm="few-shot",
        head_to_head=[("few-shot", "base"), ("base", "few-shot"), ("same-as-base", "base")],
        max_new_tokens=12,
    )
    # The same model with the same prompt writes the same greedy answer: every comparison is a tie.
    same = result.row("same-as-base")
    assert same["win_rate"] == 0.5 and same["ties"] == 6
    assert result.row("base")["baseline"] is True
    for r in result.table:
        assert 0 <= r["win_rate"] <= 1 and r["ci_low"] <= r["win_rate"] <= r["ci_high"]
        assert "mean_oracle_score" in r
    assert [r["shots"] for r in result.shot_sweep] == [0, 2]
    assert result.by_structure == []  # a dataset without a structure mix
    # Head to head reuses the answers: against the baseline it is the table's own comparison, the
    # reverse order scores the complement, and an arm with the baseline's answers ties throughout.
    fewshot_vs_base, base_vs_fewshot, same_vs_base = result.head_to_head
    assert (fewshot_vs_base["arm"], fewshot_vs_base["vs"]) == ("few-shot", "base")
    assert fewshot_vs_base["win_rate"] == result.row("few-shot")["win_rate"]
    assert base_vs_fewshot["win_rate"] == pytest.approx(1 - fewshot_vs_base["win_rate"])
    assert base_vs_fewshot["ties"] == fewshot_vs_base["ties"]
    assert same_vs_base["win_rate"] == 0.5 and same_vs_base["ties"] == 6
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["table"] == json.loads(json.dumps(result.table)) and saved["judge"] == "oracle"
    assert saved["head_to_head"] == json.loads(json.dumps(result.head_to_head))
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| few-shot | fewshot |" in report and "Shot-count sensitivity" in report
    assert "## Head to head" in report and "| same-as-base | base | 50.0% |" in report
    for png in ("win_rates.png", "shot_sweep.png"):
        assert (tmp_path / "run" / png).read_bytes()[:4] == b"\x89PNG"
    lines = (tmp_path / "run" / "generations.jsonl").read_text().splitlines()
    assert len(lines) == 6 and set(json.loads(lines[0])) >= {"base", "few-shot", "oracle-persona"}


def test_bad_arms_get_clear_errors(setup, tmp_path):
    ds, base = setup
    with pytest.raises(ValueError, match="expected name=path"):
        Arm.parse("just-a-path")
    with pytest.raises(ValueError, match="unknown option 'sideways'"):
        Arm.parse("x=runs/a:sideways")
    assert Arm.parse("o=runs/o:description") == Arm("o", "runs/o", "description", False)
    assert Arm.parse("c=runs/c:cot") == Arm("c", "runs/c", "fewshot", True)
    with pytest.raises(ValueError, match="baseline 'nope' is not one of the arms"):
        evaluate(ds, [Arm("base", str(base), "none")], baseline="nope", out_dir=tmp_path)
    two = [Arm("base", str(base), "none"), Arm("few-shot", str(base))]
    for pair in (("few-shot", "nope"), ("base", "base")):
        with pytest.raises(ValueError, match="a head-to-head pair is two different arms"):
            evaluate(ds, two, baseline="base", out_dir=tmp_path / "h", head_to_head=[pair])
    assert not (tmp_path / "h").exists()  # refused before anything was written
    with pytest.raises(LLMError, match=r"cannot load model: .*missing is not a directory"):
        evaluate(
            ds,
            [Arm("base", str(base), "none"), Arm("gone", str(tmp_path / "missing"))],
            baseline="base",
            out_dir=tmp_path / "x",
            episodes=2,
            max_new_tokens=4,
        )


def test_shot_sensitivity_scores_the_same_pairs_under_own_borrowed_and_no_shots(setup):
    import dataclasses

    import numpy as np
    import torch

    from modeling.data import EpisodeSource
    from modeling.evaluate import shot_sensitivity
    from modeling.losses import separate_pair_logps
    from modeling.train import load_model, tokenize_episode

    ds, base = setup
    result = shot_sensitivity(base, ds, episodes=6, shots=2, seed=3)
    # Recompute independently: the plain (unpacked) log-probs of the same episodes.
    model, tok = load_model(base)
    eps = EpisodeSource(ds, split="test").sample(6, shots=2, seed=3)
    cfg = TrainConfig(dataset=str(ds), out_dir="unused", init=str(base))

    def margins(batch):
        ex = [tokenize_episode(tok, e, cfg) for e in batch]
        with torch.no_grad():
            c, r, _ = separate_pair_logps(
                model,
                [x.prompt for x in ex],
                [x.chosen for x in ex],
                [x.rejected for x in ex],
                pad_id=tok.pad_token_id,
            )
        return (c - r).double().numpy()

    own = margins(eps)
    other = margins(
        [dataclasses.replace(e, shots=o.shots) for e, o in zip(eps, eps[1:] + eps[:1], strict=True)]
    )
    none = margins([dataclasses.replace(e, shots=()) for e in eps])
    assert result.episodes == 6 and result.shots == 2
    assert result.accuracy_own == pytest.approx((own > 0).mean())
    assert result.accuracy_other == pytest.approx((other > 0).mean())
    assert result.accuracy_none == pytest.approx((none > 0).mean())
    assert result.margin_gain == pytest.approx(float(np.mean(own - other)), abs=1e-3)
    assert result.margin_gain_ci[0] <= result.margin_gain <= result.margin_gain_ci[1]
    with pytest.raises(ValueError, match="at least 2 episodes"):
        shot_sensitivity(base, ds, episodes=1)


def test_style_following_prompts_one_style_and_scores_what_the_oracle_reads(setup):
    """`fspo probe --style`: every shot response of a prompt is in the prompt's style, the oracle reads
    responses back as the style they were written in, and the rate counts exact matches."""
    import random

    from modeling.data import EpisodeSource
    from modeling.evaluate import style_following, style_prompts, styles_read
    from modeling.synth import load_domain, world

    ds, base = setup
    src = EpisodeSource(ds, split="test")
    style_of = {text: style for answers in src.styled_answers.values() for text, style in answers}
    prompts, wanted, avoided = style_prompts(src, episodes=12, shots=3, seed=1)
    assert len(prompts) == 12 and len(set(wanted)) > 1 and avoided == [None] * 12
    for ep, style in zip(prompts, wanted, strict=True):
        assert len(ep.shots) == 3
        assert {style_of[t] for s in ep.shots for t in (s.chosen, s.rejected)} == {style}
    # --contrast: the preferred responses in the wanted style, every dispreferred one in a second style.
    prompts, wanted, avoided = style_prompts(src, episodes=12, shots=3, seed=1, contrast=True)
    assert len(prompts) == 12
    for ep, style, second in zip(prompts, wanted, avoided, strict=True):
        assert second is not None and second != style
        assert {style_of[s.chosen] for s in ep.shots} == {style}
        assert {style_of[s.rejected] for s in ep.shots} == {second}
    domain = load_domain("elix")
    levels = [v.name for v in domain.traits[0].values]
    rnd = random.Random(0)
    texts = [world.render_response(domain, "tides", [i], rnd) for i in range(len(levels))]
    assert styles_read(domain, texts) == [(name,) for name in levels]
    # End to end on the barely trained tiny model: a rate, not a quality bar.
    result = style_following(base, ds, episodes=6, shots=2, max_new_tokens=24)
    assert result.episodes == 6 and result.chance == pytest.approx(1 / len(levels))
    assert 0 <= result.match_rate <= result.detected <= 1
    assert result.dispreferred_rate is None
    contrast = style_following(base, ds, episodes=6, shots=2, max_new_tokens=24, contrast=True)
    assert contrast.contrast and contrast.dispreferred_rate is not None
    assert contrast.match_rate + contrast.dispreferred_rate <= contrast.detected <= 1


def test_a_cot_arm_gets_a_description_budget_on_top_of_the_response_budget(setup):
    """The CoT arm writes the description first; its response keeps the other arms' token budget."""
    from modeling.data import EpisodeSource
    from modeling.evaluate import generate_arm
    from modeling.infer import COT_DESCRIPTION_TOKENS, LocalBackend

    ds, base = setup
    budgets: list[int] = []

    class Recording(LocalBackend):
        def generate_many(self, users, **kw):
            budgets.append(kw["max_new_tokens"])
            return super().generate_many(users, **kw)

    eps = EpisodeSource(ds, split="test").sample(2, shots=1, seed=0)
    backend = Recording(base)
    plain = generate_arm(Arm("plain", base), eps, max_new_tokens=8, backend=backend)
    cot = generate_arm(Arm("cot", base, cot=True), eps, max_new_tokens=8, backend=backend)
    assert budgets == [8, 8 + COT_DESCRIPTION_TOKENS]
    assert len(plain) == len(cot) == 2


def test_it_reports_each_arm_per_preference_structure_of_the_users(setup, tmp_path):
    from modeling.judges import OracleJudge
    from modeling.synth import generate_dataset, load_dataset

    _, base = setup
    mix = {"weighted": 1, "topical": 1, "bimodal": 1, "noisy": 1}
    ds = generate_dataset(
        out_dir=tmp_path / "mix", domain="elix", users=300, pairs_per_user=8, seed=1,
        structures=mix, held_out_structures=["bimodal"],
    ).path  # fmt: skip
    arms = [Arm("base", str(base), "none"), Arm("few-shot", str(base))]
    result = evaluate(
        ds, arms, baseline="base", out_dir=tmp_path / "run", episodes=16, shots=2, max_new_tokens=8
    )
    rows = result.by_structure
    assert {r["arm"] for r in rows} == {"few-shot"}
    assert sum(r["n"] for r in rows) == 16
    assert [r["held_out"] for r in rows] == [r["structure"] == "bimodal" for r in rows]
    # Each row is the oracle's verdicts on that structure's episodes, recomputed from the saved answers.
    users = load_dataset(ds).table("users").to_pandas().set_index("user_id")
    judge = OracleJudge(ds)
    gens = [json.loads(line) for line in (tmp_path / "run" / "generations.jsonl").read_text().splitlines()]
    topics = dict(
        zip(
            load_dataset(ds).table("questions").to_pandas().text,
            load_dataset(ds).table("questions").to_pandas().topic,
            strict=True,
        )
    )
    for r in rows:
        mine = [g for g in gens if users.structure[g["user_id"]] == r["structure"]]
        wins = []
        for g in mine:
            a = judge.text_score(g["user_id"], topics[g["question"]], g["few-shot"], g["question"])
            b = judge.text_score(g["user_id"], topics[g["question"]], g["base"], g["question"])
            wins.append(1.0 if a > b + 1e-9 else 0.0 if b > a + 1e-9 else 0.5)
        assert r["n"] == len(mine) and r["win_rate"] == pytest.approx(sum(wins) / len(wins))
    assert json.loads((tmp_path / "run" / "results.json").read_text())["by_structure"] == json.loads(
        json.dumps(rows)
    )
    assert "## Per preference structure" in (tmp_path / "run" / "report.md").read_text()
