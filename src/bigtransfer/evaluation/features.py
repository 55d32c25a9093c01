"""Pre-logit features of a list of image files, cached on disk by weights, files and resolution."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..core.atomic import atomic_path
from ..core.paths import name_bytes
from ..data.datasets import Skipped
from ..data.sources import is_npz_row
from ..deploy.inference import DEFAULT_BATCH, embed_files
from ..model.checkpoints import weights_digest
from ..model.downloads import cache_dir
from ..model.resnetv2 import ResNetV2

# Bump when the way features are computed changes, so old cache entries are not reused.
CACHE_VERSION = "features-v1"


@dataclass
class FeatureSet:
    """Features of the files that decoded; `kept[i]` is the index in the input list of row i."""

    features: np.ndarray  # (n_kept, feature_dim) float32
    kept: np.ndarray  # (n_kept,) int64
    skipped: list[Skipped]
    key: str
    cache_hit: bool
    path: Path | None  # the cache file, or None when caching is off


def default_cache_dir() -> Path:
    """Where feature caches live: a 'features' folder in the download cache."""
    return cache_dir() / "features"


def files_digest(files: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of the file list in order, with each file's absolute path, size and modification time."""
    h = hashlib.sha256()
    stats: dict[str, str] = {}  # many rows of one .npz share its stat
    for f in files:
        name = str(f)
        row = ""
        if is_npz_row(name):
            name, row = name.rsplit("#", 1)
        p = str(Path(name).absolute())
        if p not in stats:
            try:
                st = os.stat(p)
                stats[p] = f"{st.st_size}|{st.st_mtime_ns}"
            except OSError:
                stats[p] = "missing"
        h.update(name_bytes(p) + f"#{row}|{stats[p]}\n".encode())  # the OS's bytes: any file name hashes
    return h.hexdigest()


def cache_key(model: ResNetV2, files: Sequence[str | os.PathLike], resolution: int, precision: str = "fp32",
              weights: str | None = None) -> str:
    """The cache key of a feature extraction: weights, data files, resolution and precision.

    `weights`: the model's weights_digest when the caller has it already (hashing a large model takes a while).
    """
    parts = [CACHE_VERSION, weights or weights_digest(model), files_digest(files), str(resolution), precision]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:32]


def _read_cache(path: Path, n_files: int) -> tuple[np.ndarray, np.ndarray, list[Skipped]] | None:
    """A cache entry's content, or None if it is missing or damaged (then it is simply recomputed)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            feats, kept = z["features"], z["kept"]
            skipped = [Skipped(p, r) for p, r in json.loads(str(z["skipped"]))]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, json.JSONDecodeError):
        return None
    if feats.ndim != 2 or kept.shape != (feats.shape[0],) or len(kept) + len(skipped) != n_files:
        return None
    if len(kept) and (kept.min() < 0 or kept.max() >= n_files or np.any(np.diff(kept) <= 0)):
        return None  # rows that would index the wrong files (or none): recompute rather than trust them
    if not np.isfinite(feats).all():  # features of finite weights are finite: this entry was tampered with
        return None
    return feats, kept.astype(np.int64), skipped


def extract_features(model: ResNetV2, files: Sequence[str | os.PathLike], resolution: int,
                     cache: str | os.PathLike | None | bool = True, precision: str = "fp32",
                     batch_size: int = DEFAULT_BATCH, workers: int | None = None, device: str = "auto",
                     progress: bool = False, weights: str | None = None, engine: str = "torch") -> FeatureSet:
    """Pre-logits of `files` at `resolution`, read from the cache when the same weights saw the same files.

    `cache`: True for the default folder, a folder path, or False/None to compute without caching.
    `weights`: the model's weights_digest, if already known. `engine`: as embed_files; the cache is shared by
    the engines, whose features agree within the export check's tolerance.
    """
    key = cache_key(model, files, resolution, precision, weights)
    path: Path | None = None
    if cache:
        folder = default_cache_dir() if cache is True else Path(cache)
        path = folder / f"{key}.npz"
        hit = _read_cache(path, len(files))
        if hit is not None:
            return FeatureSet(hit[0], hit[1], hit[2], key, True, path)
    emb = embed_files(model, files, resolution, batch_size=batch_size, workers=workers, precision=precision,
                      device=device, progress=progress, engine=engine)
    kept = np.array(emb.indices, dtype=np.int64)
    if path is not None:
        with atomic_path(path) as tmp, open(tmp, "wb") as out:
            np.savez(out, features=emb.features, kept=kept,
                     skipped=np.array(json.dumps([[s.path, s.reason] for s in emb.skipped])))
    return FeatureSet(emb.features, kept, emb.skipped, key, False, path)
