"""Download released checkpoints and label files into a local cache, never leaving a partial file."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..core.atomic import atomic_path, write_text
from ..core.errors import UserError
from .registry import BASE_URL, LABEL_FILES, ModelInfo


class DownloadError(UserError, RuntimeError):
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


def _npz_problem(path: Path) -> str | None:
    """Why `path` is not an authors' checkpoint archive (None when it is one); reads only the zip's directory."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a zip archive: {e}"
    if not any(n.startswith("resnet/") and n.endswith(".npy") for n in names):
        return f"a zip archive without the checkpoint's resnet/ arrays ({len(names)} other entries)"
    return None


def _text_problem(path: Path) -> str | None:
    """Why `path` is not a label file (one UTF-8 name per line), or None."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        return f"not UTF-8 text ({e.reason} at byte {e.start})"
    if not text.strip():
        return "empty"
    if text.lstrip()[:1] == "<":
        return "an HTML or XML page, not a list of names"
    return None


# What a download must parse as, by file type, before it enters the cache.
_VALIDATORS: dict[str, Callable[[Path], str | None]] = {".npz": _npz_problem, ".txt": _text_problem}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _digest_file(dest: Path) -> Path:
    """Where the sha256 of a cached download is recorded."""
    return dest.with_name(dest.name + ".sha256")


def cached_file_hint(path: Path) -> str:
    """The sentence that tells how to get rid of a damaged cached download."""
    return f"{path} is a cached download: delete it (rm '{path}') and it will be downloaded again"


def _check_cached(dest: Path) -> None:
    """Refuse a cached file that does not parse, or that differs from what was downloaded."""
    problem = _VALIDATORS.get(dest.suffix.lower(), lambda _: None)(dest)
    recorded = _digest_file(dest)
    if problem is None and recorded.is_file():
        want = recorded.read_text().split()[0] if recorded.read_text().strip() else ""
        if _sha256(dest) != want:
            problem = f"its sha256 differs from the one recorded at download in {recorded.name}"
    if problem:
        raise DownloadError(f"{dest}: the cached file is damaged ({problem}); {cached_file_hint(dest)}")


def fetch(url: str, dest: Path, progress: bool = True, timeout: float = 60.0, sha256: str | None = None) -> Path:
    """Return `dest`, downloading `url` to it first when it is not there yet.

    A download enters the cache only if it parses as its type (.npz: the authors' archive; .txt: UTF-8 names)
    and matches `sha256` when one is known; its sha256 is recorded beside it and checked on later use.
    """
    if dest.is_file():
        _check_cached(dest)
        return dest
    hint = f"download {url} yourself and put it at {dest}"
    if offline():
        raise DownloadError(f"{dest.name} is not in the cache and BIGTRANSFER_OFFLINE is set; {hint}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, atomic_path(dest) as tmp:
            digest = _receive(resp, tmp, url, dest.name, progress, hint)
            problem = _VALIDATORS.get(dest.suffix.lower(), lambda _: None)(tmp)
            if problem is None and sha256 is not None and digest != sha256.lower():
                problem = f"sha256 {digest}, expected {sha256}"
            if problem:
                raise DownloadError(f"{url}: the server sent something unusable as {dest.name} ({problem}); "
                                    f"nothing was cached; {hint}")
            write_text(_digest_file(dest), f"{digest}  {dest.name}\n")
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


def _receive(resp, tmp: Path, url: str, name: str, progress: bool, hint: str) -> str:
    """Stream a response into `tmp` with a progress bar; return its sha256; refuse a short read."""
    total = resp.headers.get("Content-Length")
    expected = int(total) if total is not None else None
    received = 0
    h = hashlib.sha256()
    with open(tmp, "wb") as out, tqdm(total=expected, unit="B", unit_scale=True, desc=name,
                                      disable=not progress, leave=False) as bar:
        while chunk := resp.read(1 << 20):
            out.write(chunk)
            h.update(chunk)
            received += len(chunk)
            bar.update(len(chunk))
    if expected is not None and received != expected:
        raise DownloadError(f"{url}: connection closed after {received} of {expected} bytes; {hint}")
    return h.hexdigest()


def weights_file(info: ModelInfo, progress: bool = True) -> Path:
    """Local path of a named model's weights: bundled, cached, or downloaded now."""
    if info.path is not None:
        return info.path
    if info.url is None:
        raise DownloadError(f"{info.name} has no released weights; pass a checkpoint path instead")
    # The path inside the bucket: distilled and VTAB models live in its sub-folders (distill/, vtab/).
    filename = info.url.removeprefix(BASE_URL) if info.url.startswith(BASE_URL) else info.url.rsplit("/", 1)[-1]
    return fetch(base_url() + filename, cache_dir() / filename, progress=progress, sha256=info.sha256)


def labels_file(kind: str, progress: bool = True) -> Path:
    """Local path of a released label file ('imagenet21k', 'imagenet21k_ids' or 'ilsvrc2012')."""
    filename = LABEL_FILES[kind]
    return fetch(base_url() + filename, cache_dir() / filename, progress=progress)


def read_labels(kind: str, progress: bool = True) -> list[str]:
    """Label names of a released label file, one per class index."""
    return labels_file(kind, progress).read_text(encoding="utf-8").splitlines()

