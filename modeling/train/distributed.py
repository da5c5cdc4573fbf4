"""Training on several processes (``accelerate launch``, ``torchrun``): data parallel through accelerate.

Every process draws the same global batch of a step (``examples._examples``: deterministic in seed and
step) and trains on its own contiguous shard of its episodes; the model is wrapped by
``Accelerator.prepare`` (DDP: gradients averaged in the backward pass), so every process holds the same
weights and takes the same optimizer step. Each shard's loss is scaled so that the averaged gradient is
the gradient of the 1-process loss on the whole batch (``Ranks.scale``). The reference log-probs are
computed once, each process a share of the steps, and summed (``Ranks.reference_logps``). Only the main
process writes checkpoints and shows progress.

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


def is_main_process() -> bool:
    """Whether this is the process that prints, shows progress and writes checkpoints (``RANK`` 0)."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Ranks:
    """The processes of a run, as the loop sees them; ``accelerator`` is None for one process."""

    accelerator: Any = None

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
        from accelerate import Accelerator

        return cls(Accelerator(cpu=device == "cpu"))

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

    def prepare(self, model: Any) -> Any:
        """The model the steps call: DDP-wrapped by accelerate under several processes (so the backward
        pass averages gradients), seen with the module's attributes (config, device) by the losses."""
        if self.accelerator is None:
            return model
        return _Wrapped(self.accelerator.prepare(model), model)

    def sync(self, model: Any, *, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a backward pass: gradients are averaged over the processes on the step's last one only
        (the earlier ones accumulate locally, as in gradient accumulation)."""
        if self.accelerator is None or last:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model.ddp)

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


class _Wrapped:
    """A DDP-wrapped model that calls like the wrapper (its gradient hooks run) and answers attribute
    look-ups (``config``, ``device``, ``parameters``) as the module does."""

    def __init__(self, ddp: Any, module: Any) -> None:
        self.ddp, self.module = ddp, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ddp(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.module, name)
