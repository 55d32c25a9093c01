"""onnxruntime as an engine of predict/embed/evaluate: same results as torch within the export's tolerance, checked
on the first batch, refused clearly when missing or asked for what it does not run."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.cli.predict import ENGINE_CHOICES
from bigtransfer.core.errors import UserError
from bigtransfer.deploy import engines
from bigtransfer.deploy.engines import ORT_RTOL, OnnxRuntimeRunner, check_engine
from bigtransfer.deploy.export import ExportError
from bigtransfer.deploy.inference import embed_files
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.model.resnetv2 import ResNetV2

from .test_inference import GOOD, folder  # noqa: F401  (a fixture)

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ResNetV2("R14x0.5", 4, zero_head=False).eval()
    with torch.no_grad():
        m.head.weight.normal_(0, 0.3)
    m.labels = ["cat", "dog", "bird", "fish"]
    return m


def _rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("features", [False, True])
def test_runner_matches_eager_and_records_its_check(model, features):
    x = torch.rand(3, 3, 32, 40) * 2 - 1
    run = OnnxRuntimeRunner(model, features)
    got = run(x)
    with torch.no_grad():
        want = model.forward_features(x) if features else model(x)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert _rel(got, want) <= ORT_RTOL and run.checked is not None and run.checked <= ORT_RTOL
    # Later batches (another batch size and resolution: the graph is dynamic) are not checked again.
    assert run(torch.zeros(1, 3, 48, 48)).shape[0] == 1 and run._reference is None


def test_a_wrong_graph_is_caught_on_the_first_batch(model, monkeypatch):
    run = OnnxRuntimeRunner(model, False)
    real = run.session.run
    monkeypatch.setattr(run.session, "run", lambda names, feeds: [real(names, feeds)[0] * 1.01])
    with pytest.raises(ExportError, match="differs from the eager model on the first batch"):
        run(torch.rand(2, 3, 32, 32))


def test_refusals(monkeypatch):
    with pytest.raises(UserError, match="unknown engine"):
        check_engine("tensorrt")
    with pytest.raises(UserError, match="fp32 only"):
        check_engine("onnxruntime", precision="bf16")
    with pytest.raises(UserError, match="on the CPU"):
        check_engine("onnxruntime", device="cuda")
    check_engine("onnxruntime", device="cpu")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(UserError, match=r"bigtransfer\[onnx\]"):
        engines.import_onnxruntime()
    # The CLI offers exactly the engines the library knows (the CLI names them without importing torch).
    assert ENGINE_CHOICES == engines.ENGINES
    # evaluate linear/knn refuse the same combinations before any work.
    import dataclasses

    from bigtransfer.evaluation.config import FrozenEvalConfig

    field = next(f for f in dataclasses.fields(FrozenEvalConfig) if f.name == "engine")
    assert tuple(field.metadata.get("choices", ENGINE_CHOICES)) == engines.ENGINES
    with pytest.raises(UserError, match="fp32 only"):
        FrozenEvalConfig("linear", "data", "out", engine="onnxruntime", precision="bf16").validate()
    # ... and take --engine from their command line.
    from bigtransfer.cli import build_parser
    from bigtransfer.cli.options import config_from

    for method in ("linear", "knn"):
        args = build_parser().parse_args(["evaluate", method, "--data", "d", "--out", "o", "--engine", "onnxruntime"])
        assert config_from(FrozenEvalConfig, args, method=method).engine == "onnxruntime"


def test_embed_and_cli_predict_agree_with_torch(model, folder, tmp_path, capsys):  # noqa: F811
    files = [folder / name for name in GOOD]
    ours = embed_files(model, files, 32, engine="onnxruntime", device="cpu", workers=0)
    torch_ = embed_files(model, files, 32, device="cpu", workers=0)
    assert ours.files == torch_.files
    assert np.abs(ours.features - torch_.features).max() <= 2 * ORT_RTOL * np.abs(torch_.features).max()
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    docs = {}
    for engine in ("torch", "onnxruntime"):  # compile: tests/test_fast.py
        rc = main(["predict", *map(str, files), "--weights", str(ckpt), "--resolution", "32", "--json",
                   "--device", "cpu", "--engine", engine, "--workers", "0"])
        assert rc == 0
        docs[engine] = json.loads(capsys.readouterr().out)
    for a, b in zip(docs["torch"], docs["onnxruntime"], strict=True):
        assert [t["index"] for t in a["top"]] == [t["index"] for t in b["top"]]
        assert all(abs(s["score"] - t["score"]) < 1e-4 for s, t in zip(a["top"], b["top"], strict=True))
    rc = main(["predict", str(files[0]), "--weights", str(ckpt), "--engine", "onnxruntime", "--precision", "bf16"])
    assert rc != 0 and "fp32 only" in capsys.readouterr().err
