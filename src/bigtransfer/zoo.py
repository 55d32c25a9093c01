"""Download released checkpoints and label files into a local cache, never leaving a partial file."""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
from pathlib import Path

from tqdm.auto import tqdm

from .atomic import atomic_path
from .registry import BASE_URL, LABEL_FILES, ModelInfo


class DownloadError(RuntimeError):
    """A file could not be fetched; the message says which, from where, and where to put it by hand."""


def cache_dir() -> Path:
    """Where downloads live: $BIGTRANSFER_CACHE, else ~/.cache/bigtransfer."""
    return Path(os.environ.get("BIGTRANSFER_CACHE") or Path.home() / ".cache" / "bigtransfer")


def base_url() -> str:
    """The bucket to download from: $BIGTRANSFER_BASE_URL (a mirror), else the authors' bucket."""
    url = os.environ.get("BIGTRANSFER_BASE_URL") or BASE_URL
    return url if url.endswith("/") else url + "/"


def offline() -> bool:
    """True when $BIGTRANSFER_OFFLINE asks for no network access."""
    return os.environ.get("BIGTRANSFER_OFFLINE", "").strip().lower() not in ("", "0", "false", "no")


def fetch(url: str, dest: Path, progress: bool = True, timeout: float = 60.0) -> Path:
    """Return `dest`, downloading `url` to it first when it is not there yet."""
    if dest.is_file():
        return dest
    hint = f"download {url} yourself and put it at {dest}"
    if offline():
        raise DownloadError(f"{dest.name} is not in the cache and BIGTRANSFER_OFFLINE is set; {hint}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            total = resp.headers.get("Content-Length")
            expected = int(total) if total is not None else None
            received = 0
            with open(tmp, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=dest.name,
                                              disable=not progress, leave=False) as bar:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if expected is not None and received != expected:
                raise DownloadError(f"{url}: connection closed after {received} of {expected} bytes; {hint}")
    except urllib.error.HTTPError as e:
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}; {hint}") from None
    except (urllib.error.URLError, OSError, ConnectionError) as e:
        if isinstance(e, DownloadError):
            raise
        reason = getattr(e, "reason", e)
        raise DownloadError(f"{url}: download failed ({reason}); {hint}") from None
    except Exception as e:  # http.client.IncompleteRead and friends
        if isinstance(e, DownloadError):
            raise
        raise DownloadError(f"{url}: download failed ({type(e).__name__}: {e}); {hint}") from None
    return dest


def weights_file(info: ModelInfo, progress: bool = True) -> Path:
    """Local path of a named model's weights: bundled, cached, or downloaded now."""
    if info.path is not None:
        return info.path
    if info.url is None:
        raise DownloadError(f"{info.name} has no released weights; pass a checkpoint path instead")
    filename = info.url.rsplit("/", 1)[-1]
    return fetch(base_url() + filename, cache_dir() / filename, progress=progress)


def labels_file(kind: str, progress: bool = True) -> Path:
    """Local path of a released label file ('imagenet21k', 'imagenet21k_ids' or 'ilsvrc2012')."""
    filename = LABEL_FILES[kind]
    return fetch(base_url() + filename, cache_dir() / filename, progress=progress)


def read_labels(kind: str, progress: bool = True) -> list[str]:
    """Label names of a released label file, one per class index."""
    return labels_file(kind, progress).read_text().splitlines()


def copy_into_cache(src: str | os.PathLike, filename: str | None = None) -> Path:
    """Place a file fetched by other means into the cache under its released name."""
    dest = cache_dir() / (filename or Path(src).name)
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
    return dest
