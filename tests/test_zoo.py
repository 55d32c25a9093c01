"""Downloads from a local HTTP server on 127.0.0.1: success, dropped connection, 404, offline, cache."""

import http.server
import threading

import numpy as np
import pytest
import torch

from bigtransfer import create_model
from bigtransfer.registry import RELEASED
from bigtransfer.zoo import DownloadError, cache_dir, fetch, read_labels, weights_file

from .bit_reference import random_authors_arrays, reference_logits


class _Server:
    """Serves `files` by name; names in `drop` send half their bytes and close the connection."""

    def __init__(self, files: dict[str, bytes], drop: frozenset[str] = frozenset()):
        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                name = self.path.rsplit("/", 1)[-1]
                outer.requests.append(name)
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
    assert [p.name for p in dest.parent.iterdir()] == ["file.bin"]


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
    with _Server({}) as srv:
        url = srv.url
    monkeypatch.setenv("BIGTRANSFER_BASE_URL", url)  # the server is gone now
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
