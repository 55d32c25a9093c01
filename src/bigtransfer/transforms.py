"""BiT's input transforms: squash-resize, random crop and flip for training, squash-resize for evaluation.

A transform is called as ``transform(img, generator)`` with an RGB PIL image and a ``torch.Generator`` (or None
for torch's global generator) and returns a CHW float32 tensor in [-1, 1]. The training transform draws, in this
order and only when enabled: ``top, left = torch.randint(0, precrop - crop + 1, (2,), generator=g)``, then
``flipped = torch.rand((), generator=g) < 0.5``. So the augmentation of an example is a function of the
generator's seed alone, which is what makes resumed runs see exactly the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

from .errors import UserError
from .images import squash, to_tensor


def draw_crop_flip(precrop: int, crop: int, flip: bool, crop_ok: bool,
                   generator: torch.Generator | None) -> tuple[int, int, bool]:
    """(top, left, flipped) for one training example, drawn in the documented order."""
    top = left = 0
    if crop_ok:
        top, left = (int(v) for v in torch.randint(0, precrop - crop + 1, (2,), generator=generator))
    flipped = bool(torch.rand((), generator=generator) < 0.5) if flip else False
    return top, left, flipped


@dataclass(frozen=True)
class TrainTransform:
    """Squash to precrop x precrop, random crop x crop window, random horizontal flip, pixels to [-1, 1]."""

    precrop: int
    crop: int
    flip: bool = True
    crop_ok: bool = True  # False (VTAB's no-crop tasks): squash straight to crop x crop

    def __post_init__(self) -> None:
        if self.crop < 1 or self.precrop < self.crop:
            raise UserError(f"need 1 <= crop <= precrop, got precrop {self.precrop}, crop {self.crop}")

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, flipped = draw_crop_flip(self.precrop, self.crop, self.flip, self.crop_ok, generator)
        if self.crop_ok:
            img = squash(img, self.precrop).crop((left, top, left + self.crop, top + self.crop))
        else:
            img = squash(img, self.crop)
        x = to_tensor(img)
        return x.flip(2) if flipped else x


@dataclass(frozen=True)
class EvalTransform:
    """Squash to crop x crop, pixels to [-1, 1]; deterministic (the generator is ignored)."""

    crop: int

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise UserError(f"crop must be >= 1, got {self.crop}")

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        return to_tensor(squash(img, self.crop))


def train_transform(precrop: int, crop: int, flip: bool = True, crop_ok: bool = True) -> TrainTransform:
    """The HyperRule training transform (picklable, so DataLoader workers can use it)."""
    return TrainTransform(precrop, crop, flip, crop_ok)


def eval_transform(crop: int) -> EvalTransform:
    """The HyperRule evaluation transform."""
    return EvalTransform(crop)
