"""The training data stream: per-epoch permutations of a dataset, cut into batches on the device."""

from __future__ import annotations

import itertools

import torch


class BatchSource:
    """Batches of ``(images [B, C, H, W], labels [B])`` on the training device, in the order
    of a permutation of the dataset drawn from the trainer's generator once per epoch.

    In-memory datasets (with ``.images`` and ``.labels``) are indexed directly; any other
    dataset goes through a DataLoader. The ragged last batch is dropped.
    """

    def __init__(self, dataset, batch_size: int, device: torch.device, generator: torch.Generator):
        self.device, self.generator = device, generator
        self.size = len(dataset)
        self.batch_size = min(batch_size, self.size)
        self.num_batches = self.size // self.batch_size
        self.in_memory = hasattr(dataset, "images") and hasattr(dataset, "labels")
        if self.in_memory:
            self.images = dataset.images.to(device)
            self.labels = torch.as_tensor(dataset.labels, dtype=torch.long).to(device)
        else:
            self.dataset = dataset

    def check_labels(self, num_classes: int) -> None:
        if self.in_memory and (self.labels.min() < 0 or self.labels.max() >= num_classes):
            raise ValueError(
                f"dataset labels span [{int(self.labels.min())}, {int(self.labels.max())}] but the model has "
                f"num_classes={num_classes}: labels must lie in [0, {num_classes})"
            )

    def shuffle(self) -> torch.Tensor:
        """The next epoch's order: a permutation ``[N]`` of the dataset indices."""
        return torch.randperm(self.size, generator=self.generator, device=self.generator.device)

    def steps(self, order: torch.Tensor, start: int, group: int, num_steps: int):
        """Lists of ``group`` consecutive batches of ``order``, from batch ``start`` up to the
        end of the epoch's ``num_steps`` whole steps."""
        batches = self._batches(order, start, num_steps * group)
        while chunk := list(itertools.islice(batches, group)):
            yield chunk

    def _batches(self, order: torch.Tensor, start: int, stop: int):
        size = self.batch_size
        if self.in_memory:
            for batch in range(start, stop):
                index = order[batch * size : (batch + 1) * size]
                yield self.images[index], self.labels[index]
            return
        order = order.cpu()
        batch_sampler = [order[batch * size : (batch + 1) * size].tolist() for batch in range(start, stop)]
        for images, labels in torch.utils.data.DataLoader(self.dataset, batch_sampler=batch_sampler):
            yield images.to(self.device), torch.as_tensor(labels, dtype=torch.long).to(self.device)
