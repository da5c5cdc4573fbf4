"""Every config file in docs/configs is read by what it is for: the paper-table pipelines by
``config_from_json``, the training recipes by ``TrainConfig`` (as ``fspo train --config`` reads them),
the model shapes by transformers, the launcher files by accelerate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "docs" / "configs"
FILES = sorted(p for p in CONFIGS.rglob("*") if p.suffix in (".json", ".yaml"))


def test_the_configs_folder_holds_each_kind() -> None:
    names = {p.relative_to(CONFIGS).as_posix() for p in FILES}
    assert {"accelerate/fsdp-8gpu.yaml", "llama-3.2-3b/ipo-lora.json", "paper-table-4-targets.json"} <= names


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.relative_to(CONFIGS).as_posix())
def test_every_config_in_docs_configs_parses(path: Path) -> None:
    if path.suffix == ".yaml":
        from accelerate.commands.config.config_args import load_config_from_file

        cluster = load_config_from_file(str(path))
        assert cluster.num_processes >= 1
    elif path.name == "model-config.json":
        from transformers import AutoConfig

        assert AutoConfig.from_pretrained(path).model_type == "llama"
    elif path.name.startswith("paper-table"):
        from modeling.pipeline import config_from_json

        config_from_json(path, dataset="data", out_dir="out")
    else:  # a training recipe: fspo train --config FILE --dataset D --out O
        from modeling.train import TrainConfig

        fields = json.loads(path.read_text())
        assert not {"dataset", "out_dir"} & set(fields)  # given on the command line
        TrainConfig(**{**fields, "dataset": "data", "out_dir": "out"})
