"""Which examples, with which augmentation seeds, make up training step s: a pure function of (seed, s).

Contract (what a resumable fine-tuning loop relies on):

- The global batch of step s covers positions s*B .. s*B+B-1 of an endless stream made of epochs; epoch e is
  ``torch.randperm(n)`` drawn from a generator seeded by (seed, e). Each example appears once per epoch.
- When a micro-batch (B / batch_split) is larger than the dataset (tiny few-shot sets), the step instead draws
  its B indices with replacement from a generator seeded by (seed, s), as the authors' code does.
- Example j of step s is augmented with a generator seeded by ``sample_seed(seed, s, j)``.

So `batch_indices(s, ...)` and `sample_seed` give the exact batch of any step without replaying earlier ones, and a
loader restarted at step k (``StepSampler(start_step=k)``) yields what an uninterrupted one yields from k on,
whatever the number of DataLoader workers.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


def mix_seed(*parts: object) -> int:
    """A 63-bit seed derived from the parts (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@functools.lru_cache(maxsize=4)
def _epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=_generator(mix_seed("epoch", seed, epoch)))


def sample_seed(seed: int, step: int, j: int) -> int:
    """Seed of the augmentation generator for example j of the global batch of step `step`."""
    return mix_seed("augment", seed, step, j)


def batch_indices(step: int, n: int, batch_size: int, seed: int, micro_batch: int | None = None) -> list[int]:
    """Dataset indices of the global batch of `step` (see the module docstring for the rule)."""
    if n < 1 or batch_size < 1 or step < 0:
        raise ValueError(f"need n >= 1, batch_size >= 1 and step >= 0; got n={n}, batch_size={batch_size}, step={step}")
    # The two loops differ here on purpose, and must keep doing so (it decides which images a resumed run sees):
    # fine-tuning passes its micro-batch and samples with replacement as soon as one micro-batch exceeds the data
    # (tiny few-shot sets, as the authors' code does); pre-training passes None and does so only when the whole
    # global batch does, a rule that does not depend on how many processes or micro-batches share the step.
    if (micro_batch or batch_size) > n:
        return torch.randint(n, (batch_size,), generator=_generator(mix_seed("replace", seed, step))).tolist()
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, pos = divmod(start + len(out), n)
        take = min(batch_size - len(out), n - pos)
        out.extend(_epoch_order(n, seed, epoch)[pos:pos + take].tolist())
    return out


class StepSampler(Sampler[list[tuple[int, int]]]):
    """Batch sampler for DataLoader: for each step from start_step, batch_split micro-batches of (index, aug seed)."""

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, steps: int | None = None,
                 batch_split: int = 1) -> None:
        if batch_split < 1 or batch_size % batch_split:
            raise ValueError(f"batch size {batch_size} is not divisible into {batch_split} micro-batches")
        if n < 1:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.steps, self.batch_split = start_step, steps, batch_split
        self.micro = batch_size // batch_split

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.steps is None or step < self.steps:
            idx = batch_indices(step, self.n, self.batch_size, self.seed, self.micro)
            for q in range(self.batch_split):
                js = range(q * self.micro, (q + 1) * self.micro)
                yield [(idx[j], sample_seed(self.seed, step, j)) for j in js]
            step += 1

    def __len__(self) -> int:
        if self.steps is None:
            raise TypeError("an endless StepSampler has no length; give steps=")
        return max(0, self.steps - self.start_step) * self.batch_split
