"""Downloads from a local HTTP server on 127.0.0.1: success, dropped connection, 404, offline, cache, bad bodies."""

import hashlib
import http.server
import shutil
import socket
import threading

import numpy as np
import pytest
import torch

from bigtransfer import create_model
from bigtransfer.model.checkpoints import CheckpointError
from bigtransfer.model.downloads import DownloadError, cache_dir, fetch, read_labels, weights_file
from bigtransfer.model.registry import RELEASED

from .bit_reference import random_authors_arrays, reference_logits


class _Server:
    """Serves `files` by name; names in `drop` send half their bytes and close the connection."""

    def __init__(self, files: dict[str, bytes], drop: frozenset[str] = frozenset()):
        self.requests: list[str] = []
        self.paths: list[str] = []  # the full URL paths asked for
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
                outer.paths.append(self.path)
                if name not in files:
                    self.send_error(404, "Not Found")
                    return
                body = files[name]
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if name in drop:
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/bucket/"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("BIGTRANSFER_OFFLINE", raising=False)


def test_fetch_downloads_once_and_caches(tmp_path, online):
    body = bytes(range(256)) * 4000
    with _Server({"file.bin": body}) as srv:
        dest = tmp_path / "c" / "file.bin"
        assert fetch(srv.url + "file.bin", dest, progress=False).read_bytes() == body
        assert fetch(srv.url + "file.bin", dest, progress=False) == dest
        assert srv.requests == ["file.bin"]  # the second call used the cache
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin", "file.bin.sha256"]
    assert (dest.parent / "file.bin.sha256").read_text().split()[0] == hashlib.sha256(body).hexdigest()


def test_dropped_connection_leaves_no_partial_file(tmp_path, online):
    with _Server({"big.npz": b"x" * 500_000}, drop=frozenset({"big.npz"})) as srv:
        dest = tmp_path / "big.npz"
        with pytest.raises(DownloadError, match="big.npz") as e:
            fetch(srv.url + "big.npz", dest, progress=False)
    assert "put it at" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_404_names_url_and_destination(tmp_path, online):
    with _Server({}) as srv:
        with pytest.raises(DownloadError, match="HTTP 404") as e:
            fetch(srv.url + "missing.npz", tmp_path / "missing.npz", progress=False)
    assert "missing.npz" in str(e.value) and str(tmp_path) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_offline_fails_fast_and_names_the_file(tmp_path):
    with pytest.raises(DownloadError, match="BIGTRANSFER_OFFLINE") as e:
        weights_file(RELEASED["BiT-M-R50x1"], progress=False)
    assert "BiT-M-R50x1.npz" in str(e.value) and str(cache_dir()) in str(e.value)


def test_unreachable_server_fails_with_hint(tmp_path, online, monkeypatch):
    # A port held bound but not listening refuses every connection (a closed server's port could be taken again).
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        monkeypatch.setenv("BIGTRANSFER_BASE_URL", f"http://127.0.0.1:{held.getsockname()[1]}/")
        with pytest.raises(DownloadError, match="download failed"):
            weights_file(RELEASED["BiT-S-R50x1"], progress=False)


def test_released_model_and_labels_through_a_mirror(tmp_path, online, monkeypatch):
    # A full-size R50x1 checkpoint in the authors' layout, served under its released name.
    arrays = random_authors_arrays(50, 1, classes=10, seed=5)
    npz_path = tmp_path / "src.npz"
    np.savez(npz_path, **arrays)
    labels = "\n".join(f"label{i}" for i in range(1000)).encode()
    files = {"BiT-M-R50x1-CIFAR10.npz": npz_path.read_bytes(), "ilsvrc2012_wordnet_lemmas.txt": labels}
    with _Server(files) as srv:
        monkeypatch.setenv("BIGTRANSFER_BASE_URL", srv.url)
        model = create_model("BiT-M-R50x1-CIFAR10", progress=False).eval()
        assert read_labels("ilsvrc2012", progress=False)[999] == "label999"
        again = create_model("BiT-M-R50x1-CIFAR10", num_classes=3, progress=False)
        assert srv.requests.count("BiT-M-R50x1-CIFAR10.npz") == 1
    assert (cache_dir() / "BiT-M-R50x1-CIFAR10.npz").is_file()
    assert again.num_classes == 3 and torch.count_nonzero(again.head.weight) == 0
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = reference_logits(arrays, x, 50)
        assert float((model.double()(x.double()) - ref).abs().max() / ref.abs().max()) < 1e-5


HTML_ERROR_PAGE = b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head><body>proxy error</body></html>"


@pytest.mark.parametrize("body", [bytes(np.random.default_rng(0).integers(0, 256, 300_000, dtype=np.uint8)),
                                  HTML_ERROR_PAGE], ids=["random-bytes", "html-error-page"])
def test_a_bad_download_is_not_cached(tmp_path, online, monkeypatch, body):
    with _Server({"BiT-M-R50x1.npz": body, "imagenet21k_wordnet_lemmas.txt": HTML_ERROR_PAGE}) as srv:
        monkeypatch.setenv("BIGTRANSFER_BASE_URL", srv.url)
        for _ in range(2):  # refused each time, downloaded afresh each time: nothing bad was kept
            with pytest.raises(DownloadError, match=r"BiT-M-R50x1\.npz: the server sent something unusable as "
                                                     r"BiT-M-R50x1\.npz \((not a zip archive).*nothing was cached"):
                create_model("BiT-M-R50x1", progress=False)
        with pytest.raises(DownloadError, match=r"an HTML or XML page"):
            read_labels("imagenet21k", progress=False)
        assert srv.requests.count("BiT-M-R50x1.npz") == 2
    assert list(cache_dir().iterdir()) == []


def test_a_known_sha256_must_match(tmp_path, online):
    arrays = random_authors_arrays(14, 0.5, classes=3, seed=1)
    np.savez(tmp_path / "src.npz", **arrays)
    body = (tmp_path / "src.npz").read_bytes()
    with _Server({"m.npz": body}) as srv:
        with pytest.raises(DownloadError, match="sha256 .*expected 00ff"):
            fetch(srv.url + "m.npz", tmp_path / "c" / "m.npz", progress=False, sha256="00ff")
        assert not (tmp_path / "c" / "m.npz").exists()
        good = hashlib.sha256(body).hexdigest()
        assert fetch(srv.url + "m.npz", tmp_path / "c" / "m.npz", progress=False, sha256=good).read_bytes() == body


def copy_into_cache(src, filename: str):
    """Place a file in the (per-test) download cache by hand, as a user might."""
    dest = cache_dir() / filename
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    return dest


def test_a_bad_cached_file_names_the_file_to_delete(tmp_path, online, monkeypatch):
    # Placed by hand (or by an older version that cached anything): an HTML page under a checkpoint's name.
    (tmp_path / "page.npz").write_bytes(HTML_ERROR_PAGE)
    cached = copy_into_cache(tmp_path / "page.npz", "BiT-S-R50x1.npz")
    with pytest.raises(DownloadError, match="the cached file is damaged") as e:
        create_model("BiT-S-R50x1", progress=False)
    assert f"delete it (rm '{cached}')" in str(e.value)
    # A download whose bytes changed afterwards no longer matches the sha256 recorded beside it.
    # (a small archive: the recorded digest is checked before the weights are parsed)
    np.savez(tmp_path / "src.npz", **random_authors_arrays(14, 0.5, classes=10, seed=5))
    with _Server({"BiT-M-R50x1-CIFAR10.npz": (tmp_path / "src.npz").read_bytes()}) as srv:
        monkeypatch.setenv("BIGTRANSFER_BASE_URL", srv.url)
        path = weights_file(RELEASED["BiT-M-R50x1-CIFAR10"], progress=False)
    with open(path, "r+b") as f:  # flip bytes inside an array, leaving the zip directory intact
        f.seek(path.stat().st_size // 2)
        f.write(b"\x00" * 64)
    with pytest.raises(DownloadError, match=r"sha256 differs from the one recorded") as e:
        create_model("BiT-M-R50x1-CIFAR10", progress=False)
    assert f"rm '{path}'" in str(e.value)


def test_a_cached_file_that_parses_badly_names_the_file_to_delete(tmp_path):
    arrays = random_authors_arrays(14, 0.5, classes=3, seed=1)
    arrays["resnet/root_block/standardized_conv2d/kernel"] = np.zeros((7, 7, 3), np.float32)  # not 4-D
    np.savez(tmp_path / "src.npz", **arrays)
    cached = copy_into_cache(tmp_path / "src.npz", "BiT-S-R50x1.npz")
    with pytest.raises(CheckpointError, match="4-D HWIO kernel") as e:
        create_model("BiT-S-R50x1", progress=False)
    assert f"rm '{cached}'" in str(e.value)
