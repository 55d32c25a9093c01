"""How well frozen features group the demo's digits: nearest class mean at K = 1, 5, 10 examples per class.

A diagnostic behind BiT-Mini's model card (issue 11): on the demo's fixed split (the 300 test digits of
`bigtransfer demo`), K training digits per class are drawn (60 draws per K), the class means of their
L2-normalised features are formed, and each test digit goes to the nearest mean (cosine). "pixels" uses the 8x8
images themselves, "random" R26x0.5 with seeded random weights, any other argument a checkpoint file. Images are
squashed to --size px (bilinear, optionally with a margin of --pad original pixels first); medians are printed.

    python tools/feature_ncm.py pixels random src/bigtransfer/weights/BiT-Mini-R26x0.5.safetensors --size 40
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from bigtransfer.model.factory import create_model
from bigtransfer.transfer.config import TEST_PER_CLASS
from bigtransfer.transfer.demo import SPLIT_SEED

DRAWS = 60


def demo_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices exactly as `transfer.demo.write_digits` splits them."""
    rng = np.random.default_rng(SPLIT_SEED)
    train, test = [], []
    for digit in range(10):
        idx = np.flatnonzero(labels == digit)
        idx = idx[rng.permutation(len(idx))]
        test += list(idx[:TEST_PER_CLASS])
        train += list(idx[TEST_PER_CLASS:])
    return np.array(train), np.array(test)


def features(images: np.ndarray, which: str, size: int, pad: int) -> np.ndarray:
    """(N, D) features of the 8x8 digits: the pixels, or a model's pooled pre-logits."""
    x = torch.tensor(images, dtype=torch.float32)[:, None] / 16.0
    if which == "pixels":
        return x.flatten(1).numpy()
    x = F.pad(x, (pad,) * 4) if pad else x
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1) * 2 - 1
    if which == "random":
        torch.manual_seed(0)
        model = create_model("R26x0.5", pretrained=False)
    else:
        model = create_model("R26x0.5", pretrained=which)
    with torch.inference_mode():
        return torch.cat([model.eval().forward_features(b) for b in x.split(256)]).numpy()


def ncm_accuracy(feats: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int) -> float:
    """Median over DRAWS draws of K per class of the nearest-class-mean (cosine) top-1 on the test digits."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True).clip(1e-8)
    scores = []
    for draw in range(DRAWS):
        rng = np.random.default_rng(100 + draw)
        chosen = [rng.choice(train[labels[train] == c], k, replace=False) for c in range(10)]
        means = np.stack([f[idx].mean(0) for idx in chosen])
        scores.append(float(((f[test] @ means.T).argmax(1) == labels[test]).mean()))
    return float(np.median(scores))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("features", nargs="+", help="pixels, random, or checkpoint files")
    p.add_argument("--size", type=int, default=40)
    p.add_argument("--pad", type=int, default=0, help="margin in original pixels before resizing")
    args = p.parse_args()
    torch.set_num_threads(1)
    digits = load_digits()
    train, test = demo_split(digits.target)
    print("| features | K=1 | K=5 | K=10 |\n|---|---|---|---|")
    for which in args.features:
        f = features(digits.images, which, args.size, args.pad)
        cells = " | ".join(f"{ncm_accuracy(f, digits.target, train, test, k):.3f}" for k in (1, 5, 10))
        print(f"| {which} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
