"""Training with more than one process (``accelerate launch`` or torchrun): sharding the global
batch, averaging the loss and agreeing on when to stop."""

from __future__ import annotations

import atexit
import contextlib
import os

import torch

from minild.devices import resolve_device


class Processes:
    """The processes of a run launched by ``accelerate launch`` (or torchrun), or just this one.

    Every process holds the whole dataset and identically seeded generators, so all draw the
    same global batch, timesteps and noise; each trains on its contiguous shard of the batch
    and DDP averages the gradients, which makes the run that of one process with the same
    ``batch_size`` up to float summation order. Only the main process writes files.
    """

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank, self.device, self.accelerator = 0, None, None
        if self.world_size > 1:
            from accelerate import Accelerator

            # minild's own train.precision decides autocast; accelerate only wraps the model.
            cpu = resolve_device(device_name).type == "cpu"
            self.accelerator = Accelerator(cpu=cpu, mixed_precision="no")
            if self.accelerator.num_processes != self.world_size:
                raise RuntimeError(
                    f"launched as {self.world_size} processes but accelerate set up {self.accelerator.num_processes}: "
                    "launch with `accelerate launch --multi_gpu` or torchrun (gloo on CPUs)"
                )
            self.rank, self.device = self.accelerator.process_index, self.accelerator.device
            # Tear the process group down before the interpreter does: gloo's threads abort
            # a process that exits with them still running.
            atexit.register(self.accelerator.end_training)

    def close(self) -> None:
        """After the last step: every process waits for the others, then all tear the process
        group down together, before the main one goes on alone (saving, sampling)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
            self.accelerator.end_training()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch_size(self, batch_size: int) -> None:
        if batch_size % self.world_size:
            raise ValueError(
                f"train.batch_size {batch_size} must split evenly over the {self.world_size} processes "
                "(it is the global batch)"
            )

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.accelerator is None else self.accelerator.prepare_model(model)

    def shard(self, batch_size: int) -> slice:
        if self.world_size == 1:
            return slice(None)
        size = batch_size // self.world_size
        return slice(self.rank * size, (self.rank + 1) * size)

    def no_sync(self, model, *, last: bool):
        """Skip the gradient all-reduce on all but the last forward pass of an accumulated step."""
        return contextlib.nullcontext() if last or self.accelerator is None else self.accelerator.no_sync(model)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        return value if self.accelerator is None else self.accelerator.reduce(value, "mean")

    def agree_on_stop(self, reason: str | None) -> str | None:
        """Stop all processes when any one wants to, with the first process's reason."""
        if self.accelerator is None:
            return reason
        wants = torch.tensor([reason is not None], dtype=torch.int32, device=self.device)
        if not self.accelerator.reduce(wants, "sum").item():
            return None
        reasons = [None] * self.world_size
        torch.distributed.all_gather_object(reasons, reason)
        return next(r for r in reasons if r is not None)
