"""Interop with timm and HF transformers: their files in and out, hub names, preprocessing carried, hubconf, API."""

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import bigtransfer
from bigtransfer.cli import main
from bigtransfer.core.errors import UserError
from bigtransfer.data.transforms import eval_transform
from bigtransfer.model.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from bigtransfer.model.preprocess import create_transform, data_config, resolve_data_config
from bigtransfer.model.registry import resolve
from bigtransfer.model.resnetv2 import ResNetV2
from bigtransfer.transfer.hyperrule import make_plan

REPO = Path(__file__).resolve().parent.parent
LABELS = {0: "cat", 1: "dog", 2: "owl"}


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter perturbed (GN affine and head included), so nothing cancels out in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def _hf_dir(tmp_path: Path, **config) -> tuple[Path, torch.nn.Module]:
    """An R14x0.5 written by BitForImageClassification.save_pretrained (random weights, 3 named classes)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BitConfig(embedding_size=32, hidden_sizes=[128, 256, 512, 1024], depths=[1, 1, 1, 1],
                                 id2label=LABELS, label2id={v: k for k, v in LABELS.items()}, **config)
    hf = _randomized(transformers.BitForImageClassification(cfg))
    out = tmp_path / "hf"
    hf.save_pretrained(out)
    return out, hf


def _ours(num_classes: int = 3, seed: int = 0, **kw) -> ResNetV2:
    torch.manual_seed(seed)
    return _randomized(ResNetV2("R14x0.5", num_classes, zero_head=False, **kw), seed)


@pytest.mark.parametrize("padding, dynamic_pool, mode", [(None, False, "fixed"), ("SAME", False, "same"),
                                                         ("SAME", True, "same_pool")])
def test_hf_save_pretrained_loads_with_its_padding_and_labels(tmp_path, padding, dynamic_pool, mode):
    folder, hf = _hf_dir(tmp_path, global_padding=padding, embedding_dynamic_padding=dynamic_pool)
    x = torch.rand(2, 3, 37, 45) * 2 - 1  # odd, non-square: SAME pads differ from fixed ones here
    with torch.no_grad():
        ref = hf(x).logits
    for source in (folder, folder / "model.safetensors"):  # the folder, or its weights file with config.json beside
        model = bigtransfer.create_model("R14x0.5", pretrained=source).eval()
        assert model.padding == mode and model.labels == list(LABELS.values())
        with torch.no_grad():
            got = model(x)
        assert (got - ref).abs().max() < 1e-4 * ref.abs().max()
    if mode != "fixed":  # the trap this guards against: the same weights with the authors' padding differ
        fixed = ResNetV2("R14x0.5", 3, ws_eps=1e-8)
        fixed.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (fixed.eval()(x) - ref).abs().max() > 1e-3 * ref.abs().max()


@pytest.mark.parametrize("change, message", [
    ({"layer_type": "bottleneck"}, "layer_type 'bottleneck' is not supported"),
    ({"global_padding": "VALID"}, "global_padding 'VALID' is not supported"),
    ({"num_groups": 16}, "num_groups 16 is not supported"),
    ({"id2label": {"0": "a", "2": "b", "3": "c"}}, "id2label does not number its classes"),
])
def test_hf_configs_we_cannot_build_are_refused_by_name(tmp_path, change, message):
    folder, _ = _hf_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.update(change)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message) as e:
        bigtransfer.create_model("R14x0.5", pretrained=folder)
    assert "config.json" in str(e.value)


def test_hf_placeholder_labels_are_no_labels(tmp_path):
    folder, _ = _hf_dir(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["id2label"] = {str(i): f"LABEL_{i}" for i in range(3)}
    (folder / "config.json").write_text(json.dumps(config))
    assert bigtransfer.create_model("R14x0.5", pretrained=folder).labels is None


def test_our_model_written_for_hf_loads_in_transformers_with_equal_logits_and_preprocessing(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    model = _ours()
    model.labels = ["a", "b", "c"]
    model.data_config = data_config(40)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    assert main(["convert", str(ckpt), str(tmp_path / "hf")]) == 0  # a path without suffix: an HF folder
    assert "hf: R14x0.5, 3 classes" in capsys.readouterr().out
    hf = transformers.BitForImageClassification.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.id2label == {0: "a", 1: "b", 2: "c"}
    x = torch.rand(3, 3, 40, 40) * 2 - 1
    with torch.no_grad():
        ref = model(x)
        assert (hf(x).logits - ref).abs().max() < 1e-4 * ref.abs().max()
    # The preprocessor config written beside it prepares an image exactly as our transform does.
    processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / "hf")
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    theirs = processor(img, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(theirs, eval_transform(40)(img), atol=1e-5)
    # And it reads back with everything it carried.
    back = bigtransfer.create_model("R14x0.5", pretrained=tmp_path / "hf")
    assert back.labels == ["a", "b", "c"] and back.data_config == model.data_config


def test_timm_state_dict_round_trips_through_our_loader(tmp_path):
    model = _ours(ws_eps=1e-8)  # timm standardizes with 1e-8, so the file reads back as exactly this model
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    for out in (tmp_path / "timm.pth", tmp_path / "timm.safetensors"):
        assert main(["convert", str(ckpt), str(out), *(["--to", "timm"] if out.suffix == ".safetensors" else [])]) == 0
        state, meta = read_checkpoint(out)
        raw = torch.load(out, weights_only=True) if out.suffix == ".pth" else None
        if raw is not None:
            assert "stem.conv.weight" in raw and raw["head.fc.weight"].ndim == 4  # timm's names and 1x1-conv head
        assert meta["source"] == "timm"
        back = bigtransfer.create_model("R14x0.5", pretrained=out)
        assert all(torch.equal(back.state_dict()[k], v) for k, v in model.state_dict().items())


def test_convert_refuses_formats_it_cannot_tell_or_write(tmp_path, capsys):
    ckpt = save_checkpoint(_ours(), tmp_path / "m.safetensors")
    assert main(["convert", str(ckpt), str(tmp_path / "m.txt")]) == 2
    assert "cannot tell the format" in capsys.readouterr().err
    assert main(["convert", str(ckpt), str(ckpt), "--to", "hf"]) == 2
    assert "writes a folder" in capsys.readouterr().err
    same = save_checkpoint(_ours(padding="same"), tmp_path / "same.safetensors")
    assert main(["convert", str(same), str(tmp_path / "same.npz")]) == 2
    assert "'same' padding cannot be said in the npz format" in capsys.readouterr().err


# ---------------------------------------------------------------- preprocessing carried with the model

def test_data_config_is_recorded_and_resolved_from_models_files_and_names(tmp_path):
    model = _ours()
    assert resolve_data_config(model)["input_size"] == [3, 224, 224]  # records nothing: the documented default
    model.data_config = data_config(40)
    path = save_checkpoint(model, tmp_path / "m.safetensors")
    assert resolve_data_config(path) == data_config(40)
    assert bigtransfer.create_model("R14x0.5", pretrained=path).data_config == data_config(40)
    assert resolve_data_config(path, resolution=48)["input_size"] == [3, 48, 48]
    # Names: the HyperRule's crop of the task for released fine-tuned BiT (spec 3), timm's configs (spec 7).
    assert resolve_data_config("BiT-M-R50x1-ILSVRC2012")["input_size"] == [3, 480, 480]
    assert resolve_data_config("BiT-M-R50x1-CIFAR10")["input_size"] == [3, 128, 128]
    assert resolve_data_config("BiT-M-R50x1")["input_size"] == [3, 224, 224]
    ft = resolve_data_config("resnetv2_101x3_bit.goog_in21k_ft_in1k")
    assert ft["input_size"] == [3, 448, 448] and ft["crop_pct"] == 1.0 and ft["mean"] == ft["std"] == [0.5] * 3
    assert resolve_data_config("resnetv2_152x4_bit.goog_in21k_ft_in1k")["input_size"] == [3, 480, 480]
    distilled = resolve_data_config("resnetv2_50x1_bit.goog_distilled_in1k")
    assert distilled["input_size"] == [3, 224, 224] and distilled["interpolation"] == "bicubic"
    assert resolve_data_config("resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k_384")["input_size"] == [3, 384, 384]


def test_feature_cache_tells_paddings_apart():
    from bigtransfer.model.checkpoints import weights_digest

    fixed, same = _ours(), ResNetV2("R14x0.5", 3, padding="same")
    same.load_state_dict(fixed.state_dict())
    assert weights_digest(fixed) != weights_digest(same)


def test_create_transform_defaults_are_bits_and_center_crop_is_timms():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 100, 3), dtype=np.uint8))  # 100 wide
    assert torch.equal(create_transform(data_config(40))(img), eval_transform(40)(img))  # bit for bit
    config = data_config(40, crop="center", crop_pct=0.8, interpolation="bicubic", mean=(0.4, 0.5, 0.6),
                         std=(0.2, 0.25, 0.3))
    # By hand: the shorter side to 40 / 0.8 = 50 (already), the central 40 x 40 of the 100 x 50 image.
    crop = np.asarray(img)[5:45, 30:70].astype(np.float64) / 255
    expected = (crop - [0.4, 0.5, 0.6]) / [0.2, 0.25, 0.3]
    got = create_transform(config)(img).permute(1, 2, 0).double().numpy()
    assert np.abs(got - expected).max() < 1e-5
    with pytest.raises(UserError, match="input_size"):
        create_transform({"input_size": [3, 0, 0]})


def _images(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (30 + 7 * i, 41, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_embed_and_predict_use_the_recorded_resolution_unless_told(tmp_path, capsys):
    model = _ours()
    model.data_config = data_config(40)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    images = _images(tmp_path / "img")
    assert main(["embed", str(images), "--weights", str(ckpt), "--out", str(tmp_path / "f.npy"), "--workers", "0",
                 "--no-progress"]) == 0
    assert "40x40 px" in capsys.readouterr().out
    assert main(["embed", str(images), "--weights", str(ckpt), "--out", str(tmp_path / "g.npy"), "--workers", "0",
                 "--no-progress", "--resolution", "48"]) == 0
    assert "48x48 px" in capsys.readouterr().out
    assert main(["predict", str(images / "0.png"), "--weights", str(ckpt), "--json", "--workers", "0"]) == 0
    scores = json.loads(capsys.readouterr().out)[0]["top"]
    x = eval_transform(40)(Image.open(images / "0.png").convert("RGB"))[None]
    with torch.no_grad():
        probs = torch.softmax(model(x).double(), 1)[0]
    assert scores[0]["score"] == pytest.approx(float(probs.max()), rel=1e-4)


# ---------------------------------------------------------------- hub names

class _Hub(http.server.BaseHTTPRequestHandler):
    """The two requests huggingface_hub makes per file: HEAD (commit, etag, size), then GET the bytes."""

    root: Path
    commit = "0123456789abcdef0123456789abcdef01234567"

    def _send(self, body: bool) -> None:
        m = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", self.path)
        path = self.root / m[1] / m[2] if m else None
        if path is None or not path.is_file():
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", self.commit)
        self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def do_HEAD(self):  # noqa: N802 (http.server's naming)
        self._send(body=False)

    def do_GET(self):  # noqa: N802
        self._send(body=True)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(tmp_path):
    """A local stand-in for the hub at http://127.0.0.1:PORT serving tmp_path/served/ORG/NAME/FILE."""
    handler = type("Hub", (_Hub,), {"root": tmp_path / "served"})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", tmp_path / "served"
    server.shutdown()
    server.server_close()


def test_hub_names_download_through_huggingface_hub_then_work_offline(tmp_path, hub_server, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    endpoint, served = hub_server
    folder, hf = _hf_dir(tmp_path, global_padding="SAME")
    (served / "someone" / "tiny-bit").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (served / "someone" / "tiny-bit" / name).write_bytes((folder / name).read_bytes())
    images = _images(tmp_path / "img", n=1)
    cache = tmp_path / "hub-cache"
    # The CLI in a fresh process, pointed at the local hub by huggingface_hub's own environment variables.
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_ENDPOINT": endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    run = subprocess.run([sys.executable, "-m", "bigtransfer", "predict", str(images), "--model", "someone/tiny-bit",
                          "--resolution", "37", "--json", "--workers", "0"], env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    top = json.loads(run.stdout)[0]["top"]
    x = eval_transform(37)(Image.open(next(images.iterdir())).convert("RGB"))[None]
    with torch.no_grad():
        probs = torch.softmax(hf(x).logits.double(), 1)[0]
    assert top[0]["label"] == LABELS[int(probs.argmax())]
    assert top[0]["score"] == pytest.approx(float(probs.max()), rel=1e-4)
    assert list(cache.glob("models--someone--tiny-bit/snapshots/*/model.safetensors"))  # in huggingface_hub's cache
    # Offline, from that cache (the hub gone): the same model; a repository not in the cache is one clear error.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    shutil.rmtree(served)
    model = bigtransfer.create_model("someone/tiny-bit").eval()
    assert model.padding == "same" and model.labels == list(LABELS.values())
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-4)
    with pytest.raises(UserError, match=r"timm/resnetv2_50x1_bit.goog_in21k: .*HF_HUB_OFFLINE.*hf download"):
        bigtransfer.create_model("resnetv2_50x1_bit.goog_in21k")


def test_hub_names_map_to_repositories_and_architectures():
    info = resolve("resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k")
    assert info.hub == "timm/resnetv2_152x2_bit.goog_teacher_in21k_ft_in1k" and info.arch.name == "R152x2"
    assert info.num_classes == 1000 and info.has_weights
    assert resolve("resnetv2_101x3_bit.goog_in21k").num_classes == 21843
    hf = resolve("google/bit-50")
    assert hf.hub == "google/bit-50" and hf.arch.name == "R50x1"
    with pytest.raises(UserError, match="say which weights, e.g. resnetv2_50x1_bit.goog_distilled_in1k"):
        resolve("resnetv2_50x1_bit")


def test_missing_huggingface_hub_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # makes the import fail
    with pytest.raises(UserError, match="pip install huggingface_hub"):
        bigtransfer.create_model("someone/unknown-bit")


# ---------------------------------------------------------------- torch.hub, Python API

def test_torch_hub_load_from_a_checkout():
    model = torch.hub.load(str(REPO), "bit_mini", source="local", num_classes=4)
    assert isinstance(model, ResNetV2) and model.num_classes == 4 and model.arch.name == "R26x0.5"
    scratch = torch.hub.load(str(REPO), "create_model", "R14x0.5", source="local", pretrained=False, num_classes=3)
    assert scratch.arch.name == "R14x0.5" and scratch.num_classes == 3


def test_hyperrule_lr_scheduler_follows_the_plan_at_every_step():
    plan = make_plan(1000, (32, 32), batch=128)  # warmup, three decays, 2000 updates
    param = torch.nn.Parameter(torch.zeros(1))
    # Two groups, and an lr of the optimizer's own that the scheduler must override.
    optimizer = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=99.0)
    scheduler = bigtransfer.HyperRuleLR(optimizer, plan)
    seen = []
    for _ in range(plan.end):
        assert optimizer.param_groups[0]["lr"] == optimizer.param_groups[1]["lr"]
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == [plan.lr(s) for s in range(plan.end)]
    assert seen[0] == 0.0 and max(seen) == pytest.approx(0.003 * 128 / 512)  # spec 3: first update at lr 0
    assert optimizer.param_groups[0]["lr"] == plan.lr(plan.end - 1)  # after the end: stays at the last value


def test_top_level_api_predict_returns_label_names_and_probabilities(tmp_path):
    for name in ("FinetuneConfig", "run_finetune", "predict", "HyperRuleLR", "resolve_data_config",
                 "create_transform", "make_plan"):
        assert name in bigtransfer.__all__ and hasattr(bigtransfer, name)
    model = _ours()
    model.labels = ["a", "b", "c"]
    model.data_config = data_config(36)
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    path = tmp_path / "x.png"
    img.save(path)
    preds = bigtransfer.predict(model, [img, path], top_k=2, device="cpu")
    with torch.no_grad():
        probs = torch.softmax(model(eval_transform(36)(img)[None]).double(), 1)[0]
    order = probs.argsort(descending=True)[:2]
    for p in preds:
        assert p.labels == [model.labels[int(i)] for i in order]
        assert p.probs == pytest.approx([float(probs[i]) for i in order], rel=1e-5)
    assert preds[1].path == str(path)


def test_evaluate_knn_uses_the_recorded_resolution(tmp_path):
    rng = np.random.default_rng(3)
    for c, colour in enumerate(((200, 30, 30), (30, 30, 200))):
        for split, n in (("train", 3), ("test", 2)):
            d = tmp_path / "data" / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = np.clip(np.array(colour) + rng.normal(0, 20, (24, 24, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f"{i}.png")
    model = _ours()
    model.data_config = data_config(40)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    # Without the record the HyperRule would pick 128 px for these 24 px images.
    assert main(["evaluate", "knn", "--data", str(tmp_path / "data"), "--weights", str(ckpt), "--no-cache",
                 "--device", "cpu", "--workers", "0", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["resolution"] == 40
