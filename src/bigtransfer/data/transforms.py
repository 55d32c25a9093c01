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

from ..core.errors import UserError
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


BIT_MEAN = (0.5, 0.5, 0.5)  # (x / 255 - mean) / std with these is BiT's scaling of pixels to [-1, 1]
BIT_STD = (0.5, 0.5, 0.5)
INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST,
                  "lanczos": Image.LANCZOS}
CROP_MODES = ("squash", "center")


@dataclass(frozen=True)
class EvalTransform:
    """Squash to crop x crop, pixels to [-1, 1]; deterministic (the generator is ignored).

    The defaults are BiT's evaluation transform. Other settings serve models trained elsewhere (timm's configs):
    `crop_mode="center"` resizes the shorter side to crop / crop_pct and cuts the central crop x crop;
    `mean`/`std` scale pixels as (x / 255 - mean) / std; `interpolation` names the resampling filter.
    """

    crop: int
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = BIT_MEAN
    std: tuple[float, ...] = BIT_STD
    crop_mode: str = "squash"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if self.crop < 1:
            raise UserError(f"crop must be >= 1, got {self.crop}")
        if self.interpolation not in INTERPOLATIONS:
            raise UserError(f"interpolation {self.interpolation!r}: choose one of {', '.join(INTERPOLATIONS)}")
        if self.crop_mode not in CROP_MODES:
            raise UserError(f"crop mode {self.crop_mode!r}: choose one of {', '.join(CROP_MODES)}")
        if len(self.mean) != 3 or len(self.std) != 3 or not all(s > 0 for s in self.std):
            raise UserError(f"mean and std need 3 values each, std positive; got {self.mean}, {self.std}")
        if not 0 < self.crop_pct <= 1:
            raise UserError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    def _resize(self, img: Image.Image) -> Image.Image:
        resample = INTERPOLATIONS[self.interpolation]
        if self.crop_mode == "squash":
            return img if img.size == (self.crop, self.crop) else img.resize((self.crop, self.crop), resample)
        short = int(self.crop / self.crop_pct + 0.5)  # math.floor(x + 0.5): the shorter side, as timm resizes it
        w, h = img.size
        scale = short / min(w, h)
        img = img.resize((max(self.crop, round(w * scale)), max(self.crop, round(h * scale))), resample)
        left, top = (img.size[0] - self.crop) // 2, (img.size[1] - self.crop) // 2
        return img.crop((left, top, left + self.crop, top + self.crop))

    def __call__(self, img: Image.Image, generator: torch.Generator | None = None) -> torch.Tensor:
        if (self.interpolation, self.crop_mode, self.mean, self.std) == ("bilinear", "squash", BIT_MEAN, BIT_STD):
            return to_tensor(squash(img, self.crop))  # BiT's own path, bit for bit
        x = to_tensor(self._resize(img)).add_(1.0).mul_(0.5)  # back to [0, 1]
        mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
        return x.sub_(mean).div_(std)


def train_transform(precrop: int, crop: int, flip: bool = True, crop_ok: bool = True) -> TrainTransform:
    """The HyperRule training transform (picklable, so DataLoader workers can use it)."""
    return TrainTransform(precrop, crop, flip, crop_ok)


def eval_transform(crop: int) -> EvalTransform:
    """The HyperRule evaluation transform."""
    return EvalTransform(crop)
