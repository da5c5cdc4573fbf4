"""`fspo train`'s flags come from TrainConfig's fields (modeling.cli.flags): names, types, choices, help."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Literal

import pytest

from modeling.cli import train_parser
from modeling.cli.flags import config_flags, given_fields
from modeling.train import TrainConfig

REQUIRED = ["--dataset", "data/elix", "--out", "runs/x"]


def parse(*argv: str) -> dict:
    return given_fields(train_parser().parse_args([*REQUIRED, *argv]), TrainConfig)


def test_every_documented_field_has_a_flag_and_the_tiny_shape_has_none() -> None:
    flags = {a.dest for a in train_parser()._actions}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    assert fields - flags == {"tiny"}
    assert flags - fields == {"help", "config", "device"}


def test_the_readme_commands_parse_to_the_config_they_mean() -> None:
    given = parse(
        *["--stage", "ipo", "--init", "runs/pref-ft", "--lora", "--shots", "1", "2", "--steps", "30"],
        *["--batch-size", "4", "--lr", "5e-5", "--beta", "0.1", "--max-target-tokens", "96"],
        *["--context", "none", "--targets-per-episode", "3", "--pretrain-quoted", "0.5"],
    )

    assert given == {
        "dataset": "data/elix",
        "out_dir": "runs/x",
        "init": "runs/pref-ft",
        "stage": "ipo",
        "context": "none",
        "lora": True,
        "shots": (1, 2),
        "steps": 30,
        "batch_size": 4,
        "lr": 5e-5,
        "beta": 0.1,
        "max_target_tokens": 96,
        "targets_per_episode": 3,
        "pretrain_quoted": 0.5,
    }


def test_flags_not_given_leave_the_field_to_the_config_file_or_its_default() -> None:
    assert parse() == {"dataset": "data/elix", "out_dir": "runs/x"}


def test_choices_come_from_the_literal_annotation() -> None:
    with pytest.raises(SystemExit):
        parse("--stage", "ppo")
    with pytest.raises(SystemExit):
        parse("--optimizer", "sgd")


def test_dataset_and_out_are_required() -> None:
    with pytest.raises(SystemExit):
        train_parser().parse_args(["--dataset", "data/elix"])


def test_help_shows_each_fields_help_and_default() -> None:
    text = " ".join(train_parser().format_help().split())

    assert "--shots MIN MAX few-shot pairs per prompt, drawn per episode (default 1 8)" in text
    assert "--ptx WEIGHT sft/ipo/dpo: add WEIGHT x the language-modelling loss" in text
    assert "--lr LR peak learning rate (default 0.001)" in text
    assert "cosine to 10% of the peak" in text


def test_the_config_file_sets_what_no_flag_gives_and_a_given_flag_overrides_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from modeling.cli import main

    config = tmp_path / "cfg.json"
    config.write_text(json.dumps({"stage": "ipo", "steps": 7}))
    run = [
        "train",
        "--dataset",
        str(tmp_path / "ds"),
        "--out",
        str(tmp_path / "out"),
        "--config",
        str(config),
    ]
    # Each run stops at TrainConfig's validation, whose message says which value it got.
    assert main(run) == 2
    assert "stage 'ipo' needs init" in capsys.readouterr().err
    assert main([*run, "--stage", "dpo", "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert "stage 'dpo' needs init" in err and "steps and batch_size must be >= 1" in err
    assert not (tmp_path / "out").exists()


@dataclasses.dataclass
class Toy:
    name: str = dataclasses.field(metadata={"help": "what it is called"})
    size: int | None = dataclasses.field(default=None, metadata={"help": "how big", "metavar": "N"})
    kind: Literal["a", "b"] = dataclasses.field(default="a", metadata={"help": "which", "flag": "type"})
    loud: bool = dataclasses.field(default=False, metadata={"help": "shout"})
    span: tuple[float, float] = dataclasses.field(default=(0.5, 1.5), metadata={"help": "from, to"})
    extra: dict[str, int] = dataclasses.field(default_factory=dict)


def test_the_generic_generator_reads_annotations_defaults_and_metadata() -> None:
    p = argparse.ArgumentParser()
    config_flags(p, Toy)

    args = p.parse_args(["--name", "x", "--size", "3", "--type", "b", "--loud", "--span", "1", "2"])

    assert given_fields(args, Toy) == {"name": "x", "size": 3, "kind": "b", "loud": True, "span": (1.0, 2.0)}
    assert given_fields(p.parse_args(["--name", "y"]), Toy) == {"name": "y"}
    assert "--extra" not in p.format_help()


def test_the_generator_refuses_a_documented_field_it_cannot_express() -> None:
    @dataclasses.dataclass
    class Bad:
        table: dict[str, int] = dataclasses.field(default_factory=dict, metadata={"help": "a mapping"})

    with pytest.raises(TypeError, match="table"):
        config_flags(argparse.ArgumentParser(), Bad)
