"""Training on several processes (``accelerate launch``, ``torchrun``): data parallel (DDP through
accelerate) or sharded (FSDP2, ``torch.distributed.fsdp.fully_shard``).

Every process draws the same global batch of a step (``examples._examples``: deterministic in seed and
step) and trains on its own contiguous shard of its episodes; the model is wrapped by
``Accelerator.prepare`` (DDP: gradients averaged in the backward pass), so every process holds the same
weights and takes the same optimizer step. Each shard's loss is scaled so that the averaged gradient is
the gradient of the 1-process loss on the whole batch (``Ranks.scale``). The reference log-probs are
computed once, each process a share of the steps, and summed (``Ranks.reference_logps``). Only the main
process writes checkpoints and shows progress.

Sharded (an accelerate config with ``distributed_type: FSDP``, which sets ``ACCELERATE_USE_FSDP``;
``docs/configs/accelerate/fsdp-8gpu.yaml``): each decoder block, then the rest of the model, is sharded
over the processes with FSDP2's ``fully_shard`` (each process keeps 1/N of the weights, gradients and
optimizer state; a block's weights are gathered for its forward and backward). Its gradients are
averaged as DDP's are, so the loop's shards and loss scaling are unchanged. The checkpoint is gathered
into a full state dict (every process takes part; the main one writes a normal Hugging Face checkpoint)
and so is the optimizer state of the resume point. fspo calls ``fully_shard`` itself rather than
``Accelerator.prepare``: accelerate 1.16 makes FSDP only on GPUs (on CPU it silently falls back to DDP),
and ``fully_shard`` runs on CPU with gloo too, so the sharded path the GPUs take is the one tested here.

One process (plain ``fspo train``, or a launcher with one process) makes no ``Accelerator``: every method
here is then the identity, and a run is exactly what it was before this module existed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .examples import Example


def launched_processes() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by ``accelerate launch`` and
    ``torchrun``); 1 when run plainly."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def sharding_requested() -> bool:
    """Whether the launch asks for FSDP (``accelerate launch`` with ``distributed_type: FSDP`` sets
    ``ACCELERATE_USE_FSDP``; with ``torchrun`` set it by hand). Only FSDP2 is supported."""
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return False
    version = os.environ.get("FSDP_VERSION", "2")
    if version != "2":
        raise ValueError(
            f"fspo shards with FSDP2 (fully_shard); the accelerate config asks for fsdp_version {version}: "
            "set fsdp_config.fsdp_version to 2"
        )
    return True


def is_main_process() -> bool:
    """Whether this is the process that prints, shows progress and writes checkpoints (``RANK`` 0)."""
    return int(os.environ.get("RANK", "0")) == 0


def round_robin(n: int, rank: int, world: int, *, lockstep: bool) -> list[tuple[int, bool]]:
    """Items ``rank, rank + world, ...`` of ``n``, as (index, counted); ``lockstep`` pads the share to
    ceil(n / world) items with item 0, not counted (see ``Ranks.share``)."""
    mine = [(i, True) for i in range(rank, n, world)]
    if lockstep:
        mine += [(0, False)] * (-(-n // world) - len(mine))
    return mine


@dataclass
class Ranks:
    """The processes of a run, as the loop sees them; ``accelerator`` is None for one process,
    ``sharded`` says FSDP (else DDP)."""

    accelerator: Any = None
    sharded: bool = False

    @classmethod
    def start(cls, device: str, batch_size: int) -> Ranks:
        """One process: no accelerator. Several: an ``Accelerator`` (gloo on CPU, NCCL on GPUs), once
        the batch is checked to split evenly over them."""
        world = launched_processes()
        if world == 1:
            return cls()
        if batch_size % world:
            raise ValueError(
                f"batch_size {batch_size} does not split over {world} processes: use a multiple of {world} "
                "(the global batch is the 1-process batch, each process trains on its share)"
            )
        sharded = sharding_requested()
        from accelerate import Accelerator

        return cls(Accelerator(cpu=device == "cpu"), sharded)

    @property
    def world(self) -> int:
        return 1 if self.accelerator is None else int(self.accelerator.num_processes)

    @property
    def rank(self) -> int:
        return 0 if self.accelerator is None else int(self.accelerator.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, default: str) -> str:
        """Where this process trains: the accelerator's device (its own GPU) under several processes."""
        return default if self.accelerator is None else str(self.accelerator.device)

    def shard(self, examples: Sequence[Example]) -> list[int]:
        """The indices of this process's examples in a global batch: a contiguous share of its episodes
        (a group of targets behind one user's shots, ``Example.group``, is one episode and stays whole)."""
        if self.world == 1:
            return list(range(len(examples)))
        episodes = [i if ex.group is None else ex.group for i, ex in enumerate(examples)]
        ids = sorted(set(episodes))
        per = -(-len(ids) // self.world)
        mine = set(ids[self.rank * per : (self.rank + 1) * per])
        return [i for i, e in enumerate(episodes) if e in mine]

    def share(self, n: int) -> list[tuple[int, bool]]:
        """This process's share of ``n`` items scored one by one (the held-out batches): every world-th,
        as (index, counted). Sharded, every process must call the model as often as the others (each
        call gathers weights from all of them), so a process short of one more item scores item 0 again,
        not counted."""
        return round_robin(n, self.rank, self.world, lockstep=self.sharded)

    def prepare(self, model: Any) -> Any:
        """The model the steps call: DDP-wrapped by accelerate under several processes (so the backward
        pass averages gradients), seen with the module's attributes (config, device) by the losses; or,
        sharded, ``model`` itself, sharded in place (its parameters are replaced by sharded ones: the
        optimizer is made after this)."""
        if self.accelerator is None:
            return model
        if self.sharded:
            _fully_shard(model, self.world, str(self.accelerator.device))
            return model
        return _Wrapped(self.accelerator.prepare(model), model)

    def sync(self, model: Any, *, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a backward pass: gradients are averaged over the processes on the step's last one only
        (the earlier ones accumulate locally, as in gradient accumulation). Sharded, every backward
        reduce-scatters into the sharded gradients (FSDP2 accumulates them there): the same average."""
        if self.accelerator is None or last or self.sharded:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model.ddp)

    def full_state(self, model: Any) -> dict[str, torch.Tensor] | None:
        """Sharded: the whole model's state dict, gathered to the main process's CPU (every process must
        call this; the others get an empty dict). Else None: the model's own state is whole."""
        if not self.sharded:
            return None
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        state: dict[str, torch.Tensor] = dict(get_model_state_dict(model, options=options))  # type: ignore[arg-type]
        # A tied weight (the head tied to the embeddings) is gathered once per name, as two tensors; the
        # unsharded model's checkpoint has it once (save_pretrained drops a tied name it sees shared).
        first: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), name) != name:
                state.pop(name, None)
        return state

    def optimizer_state(self, model: Any, opt: torch.optim.Optimizer) -> dict[str, Any]:
        """The optimizer's state for the resume point; sharded, gathered whole to the main process (every
        process calls this)."""
        if not self.sharded:
            return opt.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_optimizer_state_dict(model, opt, options=options)

    def load_optimizer_state(self, model: Any, opt: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Restore ``optimizer_state``'s (every process read the whole of it; sharded, each keeps its shard)."""
        if not self.sharded:
            opt.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(model, opt, optim_state_dict=state, options=options)

    def scale(self, loss: torch.Tensor, count: int) -> torch.Tensor:
        """This shard's mean loss over ``count`` items (tokens or pairs), scaled so that the gradient
        averaged over the processes is that of the mean over every shard's items:
        ``mean_r * count_r * world / Σ count``."""
        if self.accelerator is None:
            return loss
        total = self.sum(float(count))
        return loss * (count * self.world / max(total, 1.0))

    def sum(self, value: float) -> float:
        """``value`` summed over the processes."""
        if self.accelerator is None:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.accelerator.device)
        return float(self.accelerator.reduce(t, reduction="sum"))

    def weighted(self, value: float, count: int) -> float:
        """The mean over every process's items of a metric that is this process's mean over ``count``."""
        if self.accelerator is None:
            return value
        return self.sum(value * count) / max(self.sum(float(count)), 1.0)

    def mean(self, value: float) -> float:
        """The mean of the processes' ``value`` (of a scaled loss: the whole batch's loss)."""
        return self.sum(value) / self.world

    def reference_logps(
        self, compute: Callable[[list[list[Example]]], torch.Tensor], batches: list[list[Example]]
    ) -> torch.Tensor:
        """``compute(batches)`` ([steps, pairs, 2]) with each process scoring every world-th batch,
        the shares summed into the whole (zeros elsewhere)."""
        if self.accelerator is None:
            return compute(batches)
        mine = list(range(self.rank, len(batches), self.world))
        out = torch.zeros(len(batches), max(map(len, batches)), 2, dtype=torch.float64)
        if mine:
            part = compute([batches[s] for s in mine])
            out[mine, : part.shape[1]] = part
        return self.accelerator.reduce(out.to(self.accelerator.device), reduction="sum").cpu()

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """The main process runs the block first (it writes shared files: the tiny model's tokenizer)."""
        if self.accelerator is None:
            yield
            return
        with self.accelerator.main_process_first():
            yield

    def wait(self) -> None:
        """Every process waits here for the others (after the main one wrote a checkpoint)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def end(self) -> None:
        """Leave the process group once the run is written."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()


def _fully_shard(model: Any, world: int, device: str) -> None:
    """Shard ``model`` in place with FSDP2: each decoder block (the architecture's ``_no_split_modules``,
    as accelerate's transformer-based wrap policy finds them) a unit of its own, then the root (the
    embeddings, the final norm and the head, tied or not). Works on a peft model too (its frozen base
    weights are sharded like the trained adapter's)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    if not blocks:
        raise ValueError(f"{type(base).__name__} names no decoder blocks (_no_split_modules) to shard")
    mesh = init_device_mesh(torch.device(device).type, (world,))
    for module in list(model.modules()):
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


class _Wrapped:
    """A DDP-wrapped model that calls like the wrapper (its gradient hooks run) and answers attribute
    look-ups (``config``, ``device``, ``parameters``) as the module does."""

    def __init__(self, ddp: Any, module: Any) -> None:
        self.ddp, self.module = ddp, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)
