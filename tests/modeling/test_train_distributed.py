"""`fspo train` on 2 CPU processes (``accelerate launch``, gloo) trains as 1 process on the same global
batch: the same losses, held-out evaluation (split over the processes) and final weights; and a killed
2-process run resumes to the weights of an uninterrupted one. Data parallel (DDP) and sharded (FSDP2).

DDP: Pref-FT full, IPO LoRA (killed and resumed), IPO full with both auxiliary terms (cot_nll, ptx: more
than one backward per step). FSDP: Pref-FT LoRA with ptx, IPO full (killed and resumed). Each stage
meets both weights kinds and both process layouts: what parallelism changes (the shards, the loss
scaling, the reference log-probs and evaluation shared out, the gathered checkpoint) is per stage and
layout, and what it wraps (a plain model or a peft one) is per weights kind."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling.train import TrainConfig, train

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ACCELERATE_CPU = REPO / "docs" / "configs" / "accelerate" / "cpu-2proc.yaml"
FSDP_CPU = REPO / "docs" / "configs" / "accelerate" / "cpu-2proc-fsdp.yaml"
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "vocab_size": 300}
RUN = dict(
    batch_size=4,
    shots=[0, 2],
    eval_every=3,
    eval_episodes=4,
    lr=3e-3,
    warmup_steps=1,
    max_prompt_tokens=512,
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[str, str]:
    """A tiny dataset and a tiny base model pretrained on it for a few steps: (dataset, base)."""
    from modeling.synth import generate_dataset

    root = tmp_path_factory.mktemp("ddp")
    ds = str(generate_dataset(out_dir=root / "elix", domain="elix", users=60, pairs_per_user=10, seed=0).path)
    out = root / "base"
    train(TrainConfig(dataset=ds, out_dir=str(out), stage="pretrain", steps=4, tiny=TINY, **RUN))  # type: ignore[arg-type]
    return ds, str(out)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(config: Path, out: Path, launch: Path = ACCELERATE_CPU) -> list[str]:
    """``accelerate launch --config_file cpu-2proc.yaml -m modeling.cli train``, as the README has it."""
    return [
        *[sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch)],
        *["--main_process_port", str(_free_port()), "-m", "modeling.cli", "train"],
        *["--dataset", json.loads(config.read_text())["dataset"], "--config", str(config), "--out", str(out)],
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}


def _two_processes(config: Path, out: Path, launch: Path = ACCELERATE_CPU) -> str:
    proc = subprocess.run(
        _command(config, out, launch), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _config(tmp_path: Path, name: str, **fields) -> Path:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps({**RUN, **fields}))
    return path


def _one_process(config: Path, out: Path) -> None:
    fields = json.loads(config.read_text())
    train(TrainConfig(**{**fields, "out_dir": str(out)}))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_same_run(a: Path, b: Path) -> None:
    ha = json.loads((a / "fspo.json").read_text())["metrics"]["history"]
    hb = json.loads((b / "fspo.json").read_text())["metrics"]["history"]
    assert [h["step"] for h in ha] == [h["step"] for h in hb]
    for x, y in zip(ha, hb, strict=True):
        for key in (
            *("loss", "eval_loss", "eval_pref_accuracy", "pref_accuracy", "reward_margin"),
            *("pairs", "prompts_cut", "ptx_loss", "cot_nll"),
        ):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-5), (x["step"], key)
    wa, wb = _weights(a), _weights(b)
    assert wa and wa.keys() == wb.keys()
    for name in wa:
        # Adam divides each gradient by its running RMS: a near-zero gradient (an embedding row barely
        # used), summed over two shards in another order, can move its weight by a few 1e-5 (lr 3e-3).
        assert torch.allclose(wa[name], wb[name], atol=1e-4), name


def test_pref_ft_on_two_processes_trains_as_one_on_the_same_global_batch(base, tmp_path):
    ds, init = base
    config = _config(tmp_path, "sft", dataset=ds, init=init, stage="sft", steps=6, save_every=3)
    _one_process(config, tmp_path / "one")
    printed = _two_processes(config, tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert printed.count("wrote ") == 1  # the main process alone prints
    assert not (tmp_path / "two" / "checkpoint-last").exists()


def _killed_after_first_resume_point(config: Path, out: Path, launch: Path = ACCELERATE_CPU) -> None:
    """Launch 2 processes and kill them (the launcher and both) once the first resume point is written."""
    proc = subprocess.Popen(
        _command(config, out, launch),
        cwd=REPO,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    state = out / "checkpoint-last" / "trainer_state.pt"
    deadline = time.monotonic() + 180
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "fspo.json").exists()  # killed before it finished
    steps = json.loads(config.read_text())["steps"]
    assert 0 < torch.load(state, weights_only=False)["step"] < steps


def test_ipo_lora_killed_on_two_processes_resumes_to_the_one_process_run(base, tmp_path):
    """One 2-process run killed after its first resume point, then run again, ends where an
    uninterrupted 1-process run does: two launches check both the resume and the equivalence."""
    ds, init = base
    fields = dict(dataset=ds, init=init, stage="ipo", lora=True, lora_r=4, beta=0.1, steps=12)
    config = _config(tmp_path, "ipo", save_every=2, **{**fields, "eval_every": 6})
    _one_process(config, tmp_path / "one")
    killed = tmp_path / "killed"
    _killed_after_first_resume_point(config, killed)
    _two_processes(config, killed)
    _assert_same_run(tmp_path / "one", killed)
    assert (killed / "adapter_config.json").is_file()


def test_ipo_full_with_cot_nll_and_ptx_on_two_processes_trains_as_one(base, tmp_path):
    """Three backward passes a step (IPO, then each auxiliary term's), the gradients averaged on the last."""
    ds, init = base
    fields = dict(dataset=ds, init=init, stage="ipo", cot=True, cot_nll=0.5, ptx=0.5, beta=0.1, steps=4)
    config = _config(tmp_path, "ipo-aux", save_every=10, **{**fields, "eval_every": 2})
    _one_process(config, tmp_path / "one")
    _two_processes(config, tmp_path / "two")
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    final = json.loads((tmp_path / "two" / "fspo.json").read_text())["metrics"]["final"]
    assert final["ptx_loss"] > 0 and final["cot_nll"] > 0


def test_pref_ft_lora_sharded_on_two_processes_trains_as_one(base, tmp_path):
    """FSDP2 over 2 processes: each holds half of every weight; the adapter is gathered and written once."""
    ds, init = base
    fields = dict(dataset=ds, init=init, stage="sft", lora=True, lora_r=4, ptx=0.5, steps=4)
    config = _config(tmp_path, "sft-lora", save_every=10, **fields)
    _one_process(config, tmp_path / "one")
    printed = _two_processes(config, tmp_path / "two", FSDP_CPU)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    assert printed.count("wrote ") == 1
    assert (tmp_path / "two" / "adapter_config.json").is_file()


def test_ipo_full_sharded_killed_on_two_processes_resumes_to_the_one_process_run(base, tmp_path):
    """The resume point of a sharded run holds the gathered weights and RMSprop state; each process
    takes its shard of them back."""
    ds, init = base
    # RMSprop (the paper's) at the suite's lr 3e-3 diverges on this tiny model, which amplifies the
    # float noise of another reduction order past any tolerance (1 process vs 2 sharded: 4e-4 apart in
    # held-out loss at step 4, 10% at step 8); at 1e-4 it trains smoothly (2e-5 apart).
    fields = dict(dataset=ds, init=init, stage="ipo", optimizer="rmsprop", lr=1e-4, beta=0.1, steps=8)
    config = _config(tmp_path, "ipo-fsdp", save_every=2, **{**fields, "eval_every": 4})
    _one_process(config, tmp_path / "one")
    killed = tmp_path / "killed"
    _killed_after_first_resume_point(config, killed, FSDP_CPU)
    _two_processes(config, killed, FSDP_CPU)
    _assert_same_run(tmp_path / "one", killed)
    # The same files as the unsharded run's (the tied head once, as save_pretrained writes it).
    assert _weights(killed).keys() == _weights(tmp_path / "one").keys()
