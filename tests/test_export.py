"""ONNX and TorchScript export: WS folded into constant conv kernels, any input size, eager logits reproduced."""

import json
import sys
import warnings

import numpy as np
import pytest
import torch

from bigtransfer.cli import main
from bigtransfer.deploy.export import check_onnx, export, folded_module, onnx_weight_ops
from bigtransfer.model.checkpoints import save_checkpoint
from bigtransfer.model.resnetv2 import ResNetV2, StdConv2d

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

SIZES = ((64, 64), (48, 80))  # two sizes, one not square: fixed H/W in the graph would fail one of them


@pytest.fixture(scope="module")
def model():
    """A tiny model whose every parameter is random (GN affine and head included), so nothing cancels out."""
    torch.manual_seed(0)
    m = ResNetV2("R14x0.5", 7, zero_head=False).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "gn" in name or name.startswith("norm"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
        m.head.weight.normal_(0, 0.2)
        m.head.bias.normal_(0, 0.5)
    return m


@pytest.fixture(scope="module")
def onnx_export(model, tmp_path_factory):
    """(path, check) of one ONNX export with a dynamic batch, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp("onnx") / "m.onnx"
    return out, export(model, out, "onnx", dynamic_batch=True, sizes=SIZES)


@pytest.fixture(scope="module")
def torchscript_export(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("ts") / "m.pt"
    return out, export(model, out, "torchscript", sizes=SIZES)


def _rel(got, ref):
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def _inputs(batch):
    g = torch.Generator().manual_seed(1)
    return [torch.rand(batch, 3, h, w, generator=g) * 2 - 1 for h, w in SIZES]


def test_onnx_matches_eager_at_two_sizes(model, onnx_export):
    out, check = onnx_export
    assert check.checked and check.max_rel_error < 1e-4
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for x in _inputs(batch=3):
        with torch.no_grad():
            ref = model(x).numpy()
        assert np.abs(ref).max() > 0.1  # logits are not trivially zero
        got = session.run(None, {"pixels": x.numpy()})[0]
        assert got.shape == ref.shape
        assert _rel(got, ref) < 1e-4
    assert [p.name for p in out.parent.iterdir()] == ["m.onnx"]  # no temporary file left behind


def test_onnx_graph_has_plain_convs_and_no_ops_on_weights(model, onnx_export):
    out, _ = onnx_export
    graph = onnx.load(str(out)).graph
    inits = {i.name: i for i in graph.initializer}
    ops = [n.op_type for n in graph.node]
    convs = [n for n in graph.node if n.op_type == "Conv"]
    std_convs = sum(isinstance(m, StdConv2d) for m in model.modules())
    assert len(convs) == std_convs + 1  # every standardized conv plus the head
    assert all(c.input[1] in inits for c in convs)  # kernels are stored constants, not computed
    assert "BatchNormalization" not in ops  # no training-mode batch-norm trick
    assert onnx_weight_ops(out) == []
    # The kernels in the file are the standardized ones: zero mean and unit variance per output channel.
    root = onnx.numpy_helper.to_array(inits[convs[0].input[1]])
    assert np.allclose(root.mean(axis=(1, 2, 3)), 0, atol=1e-5)
    assert np.allclose(root.var(axis=(1, 2, 3)), 1, atol=1e-3)
    # Height and width are symbolic.
    dims = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]


def test_weight_op_inspection_flags_an_unfolded_export(model, tmp_path):
    """The inspection is not vacuous: exporting the StdConv2d model as is leaves normalizing ops on weights."""
    out = tmp_path / "raw.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 32, 32),), str(out), dynamo=False, do_constant_folding=False)
    found = {f.split()[0] for f in onnx_weight_ops(out)}
    # Whichever way the eager model standardizes (var_mean, batch-norm or layer-norm calls), its statistics show up.
    assert found & {"ReduceMean", "BatchNormalization", "LayerNormalization", "Sqrt"}


def test_torchscript_matches_eager_at_two_sizes(model, torchscript_export):
    out, check = torchscript_export
    assert check.checked and check.max_rel_error < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated but still the TorchScript API
        loaded = torch.jit.load(str(out))
    assert "var_mean" not in str(loaded.inlined_graph)  # standardization is not recomputed at run time
    for x in _inputs(batch=2):
        with torch.no_grad():
            assert _rel(loaded(x).numpy(), model(x).numpy()) < 1e-4


def test_folded_module_leaves_the_source_model_alone(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = folded_module(model)
    assert not any(isinstance(m, StdConv2d) for m in folded.modules())
    assert any(isinstance(m, StdConv2d) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_cli_export_checks_and_reports(model, tmp_path, capsys):
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    out = tmp_path / "exported" / "m.onnx"
    assert main(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(out), "--dynamic-batch"]) == 0
    text = capsys.readouterr().out
    assert "checked against the eager model" in text and "224x224" in text and "160x96" in text
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        assert _rel(session.run(None, {"pixels": x.numpy()})[0], model(x).numpy()) < 1e-4


def test_onnx_is_dynamic_by_default_with_named_io_and_deployment_metadata(model, tmp_path):
    from bigtransfer.model.preprocess import data_config

    named = ResNetV2("R14x0.5", 7)
    named.load_state_dict(model.state_dict())
    named.eval().labels = [f"class {i}" for i in range(7)]
    named.data_config = data_config(40)
    out = tmp_path / "m.onnx"
    check = export(named, out, "onnx")  # no dynamic_batch argument: any batch is the default
    assert set(check.rel_errors) == {"1x3x40x40", "1x3x160x96", "3x3x40x40", "3x3x160x96"}  # own size, batch 1 and 3
    proto = onnx.load(str(out))
    assert [i.name for i in proto.graph.input] == ["pixels"] and [o.name for o in proto.graph.output] == ["logits"]
    meta = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(meta["labels"]) == named.labels and meta["resolution"] == "40"
    assert meta["input_scaling"].startswith("pixels / 127.5 - 1") and json.loads(meta["mean"]) == [0.5] * 3
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, 40, 40) * 2 - 1
        with torch.no_grad():
            assert _rel(session.run(["logits"], {"pixels": x.numpy()})[0], named(x).numpy()) < 1e-4


def test_same_padded_models_are_refused_by_export(tmp_path):
    from bigtransfer.deploy.export import ExportError

    with pytest.raises(ExportError, match="'same' padding"):
        export(ResNetV2("R14x0.5", 3, padding="same"), tmp_path / "m.onnx", "onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_export_fails_and_writes_nothing_when_the_check_fails(model, tmp_path, capsys):
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    out = tmp_path / "m.onnx"
    # No float32 graph reproduces eager logits bit for bit, so a zero tolerance must fail the check.
    assert main(["export", "--weights", str(ckpt), "--format", "onnx", "--out", str(out), "--rtol", "0"]) == 1
    assert "differs from the eager model" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_without_onnxruntime_the_export_says_it_could_not_check(model, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    check = check_onnx(model, tmp_path / "unused.onnx")
    assert not check.checked and "onnxruntime is not installed" in check.note


def test_bad_checkpoint_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    assert main(["export", "--weights", str(bad), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "m.pt").exists()
