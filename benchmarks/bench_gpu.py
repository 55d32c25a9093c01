"""GPU speed: ours against HF transformers' BiT and timm's resnetv2_*_bit, same weights, same GPU, one process.

Inference at 224 and 480 px, batch 64, in fp32 (TF32 off), TF32 and bf16; a training step (SGD with momentum,
cross-entropy, bf16 autocast, channels-last for every candidate) at 128 and 480 px with the largest batch, among
powers of two, that fits every candidate. Images/s, peak memory, and model FLOP utilisation (MFU) against the
device's published dense bf16 peak (a training step counts 3x the forward's FLOPs). torch.compile is tried for
both loops on R50x1 at the headline settings (inference 224 px bf16, training 128 px), after every eager part
(its compile time is reported apart); a candidate that fails is reported with its error and
the rest go on. Each part has a time budget: what does not fit is listed as skipped.

Writes a Markdown table file (default benchmarks/RESULTS-gpu.md) and a raw JSON-lines log (benchmarks/logs/).
Without CUDA it refuses, unless told `--device cpu --tiny` (a smoke run on tiny models, for CI).
Run with PYTHONPATH=src when bigtransfer is not installed: `make gpu-check` does.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_models import flops_per_image, our_model  # noqa: E402
from bigtransfer.core.atomic import write_text  # noqa: E402
from bigtransfer.deploy.inference_model import prepare_for_inference  # noqa: E402
from peers import hf_bit, hf_logits, timm_bit  # noqa: E402

HERE = Path(__file__).resolve().parent
# Published dense (no sparsity) bf16 tensor-core peaks, FLOP/s, by a substring of torch.cuda.get_device_name().
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12}
MODES = ("fp32", "tf32", "bf16")


@dataclass
class Plan:
    """What to run: architectures, resolutions, batch sizes, and the time budget."""

    device: str
    archs: tuple[str, ...] = ("R50x1", "R152x2")
    infer_sizes: tuple[int, ...] = (224, 480)
    train_sizes: tuple[int, ...] = (128, 480)
    infer_batch: int = 64
    train_batches: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    compile_archs: tuple[str, ...] = ("R50x1",)
    min_time_s: float = 0.5  # timed calls per candidate last at least this long (after warm-up)
    budget_s: float = 330.0


def tiny_plan(device: str, budget_s: float) -> Plan:
    """A smoke run: the tiniest models and sizes, every code path, seconds on a CPU."""
    return Plan(device, archs=("R14x0.5",), infer_sizes=(32,), train_sizes=(32,), infer_batch=2,
                train_batches=(2, 4), compile_archs=(), min_time_s=0.0, budget_s=budget_s)


@dataclass
class Row:
    """One measured (or failed) candidate."""

    part: str  # "infer" or "train"
    arch: str
    size: int
    batch: int
    mode: str
    candidate: str
    images_per_s: float | None = None
    peak_mib: float | None = None
    mfu: float | None = None
    compile_s: float | None = None
    error: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- the device

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def bf16_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in BF16_PEAK.items() if k in name), None)


@contextlib.contextmanager
def tf32(enabled: bool):
    """TF32 on or off for cuDNN convolutions and cuBLAS matmuls, restored afterwards."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def timm_peer():
    """timm's BiT builder, or the reason it cannot be used (it is optional, and may not import at all)."""
    try:
        importlib.import_module("timm")
        return timm_bit, None
    except Exception as e:  # timm can fail with ImportError, or RuntimeError from a torchvision clash
        return None, f"timm unavailable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"


# ---------------------------------------------------------------- timing

def time_call(fn: Callable[[], object], device: torch.device, min_time_s: float) -> tuple[float, float]:
    """(seconds of the first call, seconds per call after warm-up): the first call includes any compilation."""
    start = time.perf_counter()
    fn()
    sync(device)
    first = time.perf_counter() - start
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    one = time.perf_counter() - start
    reps = max(3, min(50, math.ceil(min_time_s / max(one, 1e-6))))
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    sync(device)
    return first, (time.perf_counter() - start) / reps


def measure(row: Row, fn_factory: Callable[[], Callable[[], object]], device: torch.device, min_time_s: float,
            flops: float, peak: float | None) -> Row:
    """Fill `row` with images/s, peak memory and MFU of the step `fn_factory()` builds; an error is recorded."""
    fn = None
    try:
        reset_peak(device)
        fn = fn_factory()
        first, secs = time_call(fn, device, min_time_s)
        row.images_per_s = row.batch / secs
        row.peak_mib = peak_mib(device)
        row.mfu = row.images_per_s * flops / peak if peak else None
        if "compile" in row.candidate:
            row.compile_s = first
    except Exception as e:  # one candidate failing (OOM, a compile error) must not end the run
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        row.extra["traceback"] = traceback.format_exc()[-2000:]
    finally:
        del fn
        reset_peak(device)
    return row


# ---------------------------------------------------------------- candidates

def peer_models(arch: str) -> tuple[dict[str, torch.nn.Module], str | None]:
    """(ours (the ResNetV2), hf and, when it imports, timm, holding the same random weights on the CPU; why timm
    is missing, or None)."""
    ours = our_model(arch)
    models = {"ours": ours, "hf": hf_bit(ours)}
    builder, why = timm_peer()
    if builder is not None:
        models["timm"] = builder(ours)
    return models, why


def forward_of(name: str, model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return hf_logits(model) if name == "hf" else model


def inference_step(name: str, model: torch.nn.Module, x: torch.Tensor, mode: str, compiled: bool) -> Callable:
    """One forward pass of `x` by candidate `name` in `mode` (fp32, tf32 or bf16)."""
    if name == "ours":
        fast = prepare_for_inference(model, "bf16" if mode == "bf16" else "fp32", compile=compiled)
        return lambda: fast(x)
    fwd = forward_of(name, model.eval().to(memory_format=torch.channels_last))
    fwd = torch.compile(fwd) if compiled else fwd
    amp = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if mode == "bf16" else contextlib.nullcontext

    def step():
        with torch.no_grad(), amp():
            return fwd(x)
    return step


def training_step(name: str, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool) -> Callable:
    """One SGD-momentum step (bf16 autocast, channels-last) of candidate `name` on (x, y)."""
    model.train().to(memory_format=torch.channels_last)
    fwd = forward_of(name, model)
    fwd = torch.compile(fwd) if compiled else fwd
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9, fused=x.device.type == "cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(fwd(x).float(), y)
        loss.backward()
        opt.step()
        return loss
    return step


@contextlib.contextmanager
def on_device(model: torch.nn.Module, device: torch.device):
    """`model` on `device` while inside, back on the CPU (gradients dropped) afterwards, so each candidate's peak
    memory is its own."""
    model.to(device)
    try:
        yield model
    finally:
        for p in model.parameters():
            p.grad = None
        model.to("cpu")


# ---------------------------------------------------------------- the parts

class Bench:
    """Runs the plan's parts within its budget, collecting rows and the reasons anything was skipped."""

    def __init__(self, plan: Plan, log: Path) -> None:
        self.plan, self.log = plan, log
        self.device = torch.device(plan.device)
        self.peak = bf16_peak(self.device)
        self.rows: list[Row] = []
        self.skipped: list[str] = []
        self.notes: list[str] = []
        self.batches: dict[tuple[str, int], int] = {}
        self.compiling = False
        self.start = time.perf_counter()
        self.on_part: Callable[[], None] = lambda: None  # called after each part (the caller writes the tables)

    def left(self) -> float:
        return self.plan.budget_s - (time.perf_counter() - self.start)

    def record(self, row: Row) -> None:
        self.rows.append(row)
        shown = f"{row.images_per_s:9.1f} img/s" if row.images_per_s else f"FAILED {row.error}"
        print(f"{row.part:5} {row.arch:7} {row.size:4}px b{row.batch:<5} {row.mode:5} {row.candidate:14} {shown}",
              flush=True)
        with open(self.log, "a") as f:
            f.write(json.dumps({k: v for k, v in asdict(row).items() if k != "extra"} |
                               {"error_detail": row.extra.get("traceback")}) + "\n")

    def candidates(self) -> list[tuple[str, bool]]:
        """(name, compiled) pairs of this part: eager ones in the first pass, compiled ones in the second."""
        return [(name, self.compiling) for name in self.names]

    def inference(self, arch: str, models: dict[str, torch.nn.Module], size: int) -> None:
        flops = flops_per_image(arch, size)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(self.plan.infer_batch, 3, size, size, generator=g) * 2 - 1).to(self.device)
        for mode in MODES if not self.compiling else ("bf16",):
            if self.device.type != "cuda" and mode == "tf32":
                continue  # TF32 is a CUDA setting
            for name, compiled in self.candidates():
                label = name + ("-compile" if compiled else "")
                row = Row("infer", arch, size, self.plan.infer_batch, mode, label)
                with on_device(models[name], self.device) as m, tf32(mode == "tf32"):
                    self.record(measure(row, lambda m=m, n=name, c=compiled, md=mode: inference_step(n, m, x, md, c),
                                        self.device, self.plan.min_time_s, flops, self.peak))

    def fits(self, name: str, model: torch.nn.Module, size: int, batch: int) -> bool:
        """Whether one training step of `batch` images fits on the device (an out-of-memory error says no)."""
        x = torch.zeros(batch, 3, size, size, device=self.device)
        y = torch.zeros(batch, dtype=torch.long, device=self.device)
        try:
            with on_device(model, self.device) as m:
                training_step(name, m, x, y, False)()
                sync(self.device)
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            del x, y
            reset_peak(self.device)

    def largest_batch(self, models: dict[str, torch.nn.Module], size: int) -> int:
        """The largest of plan.train_batches that fits every candidate (uncompiled: compiling saves memory)."""
        best = 0
        for batch in self.plan.train_batches:
            if not all(self.fits(name, models[name], size, batch) for name in self.names):
                break
            best = batch
        return best

    def training(self, arch: str, models: dict[str, torch.nn.Module], size: int) -> None:
        # The compiled pass reuses the eager pass's batch: the ratio of compiled and eager is then like for like.
        batch = self.batches.get((arch, size)) or self.largest_batch(models, size)
        self.batches[(arch, size)] = batch
        if not batch:
            self.skipped.append(f"train {arch} {size}px: not even batch {self.plan.train_batches[0]} fits")
            return
        flops = 3 * flops_per_image(arch, size)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(batch, 3, size, size, generator=g) * 2 - 1).to(self.device)
        y = torch.randint(0, 1000, (batch,), generator=g).to(self.device)
        for name, compiled in self.candidates():
            row = Row("train", arch, size, batch, "bf16", name + ("-compile" if compiled else ""))
            with on_device(models[name], self.device) as m:
                self.record(measure(row, lambda m=m, n=name, c=compiled: training_step(n, m, x, y, c),
                                    self.device, self.plan.min_time_s, flops, self.peak))

    def agreement(self, arch: str, models: dict[str, torch.nn.Module]) -> None:
        """The peers compute our logits (fp32, TF32 off): the comparison is of the same function."""
        x = torch.rand(2, 3, 64, 64) * 2 - 1
        with torch.no_grad():
            ref = models["ours"].eval()(x)
            for name in self.names[1:]:
                got = forward_of(name, models[name].eval())(x)
                err = float((got - ref).abs().max() / ref.abs().max())
                self.notes.append(f"{arch}: max |{name} - ours| / max |ours| = {err:.1e} (same weights, CPU fp32)")

    def run(self) -> None:
        """Eager candidates on every arch and size, then torch.compile on the headline settings of compile_archs."""
        # Headline settings first (inference 224 px, training 128 px), so a tight budget cuts the 480 px ones.
        parts = [p for pair in zip(self.plan.infer_sizes, self.plan.train_sizes, strict=True)
                 for p in (("infer", pair[0]), ("train", pair[1]))]
        for arch in self.plan.archs:
            self.run_parts(arch, parts)
        self.compiling = True
        for arch in self.plan.compile_archs:
            self.run_parts(arch, parts[:2], reserve_s=60.0)

    def run_parts(self, arch: str, parts: list[tuple[str, int]], reserve_s: float = 0.0) -> None:
        """The parts for one arch while the budget lasts (keeping `reserve_s` for a compile's first call)."""
        models, why = peer_models(arch)
        if why and why not in self.notes:
            self.notes.append(why)
        self.names = list(models)
        if not self.compiling:
            self.agreement(arch, models)
        for part, size in parts:
            label = f"{part} {arch} {size}px{' torch.compile' if self.compiling else ''}"
            if self.left() <= reserve_s:
                self.skipped.append(f"{label}: over the {self.plan.budget_s:.0f} s budget")
                continue
            (self.inference if part == "infer" else self.training)(arch, models, size)
            self.on_part()
        del models
        gc.collect()


# ---------------------------------------------------------------- the report

def best(rows: list[Row], prefix: str) -> Row | None:
    """The fastest measured row among candidates named `prefix` or `prefix`-compile."""
    rows = [r for r in rows if r.images_per_s and r.candidate.split("-")[0] == prefix]
    return max(rows, key=lambda r: r.images_per_s, default=None)


def ratios(rows: list[Row]) -> list[str]:
    """Per setting: ours (with or without compile, whichever won) / the faster peer, and the issue's targets."""
    lines = []
    settings = sorted({(r.part, r.arch, r.size, r.batch, r.mode) for r in rows})
    for part, arch, size, batch, mode in settings:
        same = [r for r in rows if (r.part, r.arch, r.size, r.batch, r.mode) == (part, arch, size, batch, mode)]
        ours = best(same, "ours")
        peers = [b for b in (best(same, "hf"), best(same, "timm")) if b is not None]
        if ours is None or not peers:
            continue
        peer = max(peers, key=lambda r: r.images_per_s)
        ratio = ours.images_per_s / peer.images_per_s
        target = {("train", 128, "bf16"): 1.3, ("infer", 224, "bf16"): 1.5}.get((part, size, mode))
        verdict = f" (target {target}x: {'met' if ratio >= target else 'NOT met'})" if target else ""
        lines.append(f"- {part} {arch} {size}px b{batch} {mode}: {ours.candidate} {ours.images_per_s:.1f} img/s / "
                     f"{peer.candidate} {peer.images_per_s:.1f} = **{ratio:.2f}x**{verdict}")
    return lines


def _cell(v: float | None, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def markdown(bench: Bench, header: list[str]) -> str:
    """RESULTS-gpu.md: the machine, the tables, the ratios, what was skipped."""
    out = ["# GPU speed: bigtransfer vs HF transformers and timm (issue 14)", "", *header, ""]
    out += ["Written by `benchmarks/bench_gpu.py` (`make gpu-check`); raw rows in the log named above. MFU: "
            "images/s x FLOPs per image (training: 3x the forward) / the device's published dense bf16 peak.", ""]
    for part, title in (("infer", "Inference"), ("train", "Training step (bf16 autocast, channels-last, SGD)")):
        out += [f"## {title}", "", "| arch | px | batch | mode | candidate | images/s | peak MiB | MFU | compile s |"
                " note |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in bench.rows if r.part == part):
            out.append(f"| {r.arch} | {r.size} | {r.batch} | {r.mode} | {r.candidate} | {_cell(r.images_per_s, '.1f')} "
                       f"| {_cell(r.peak_mib, '.0f')} | {_cell(r.mfu, '.1%')} | {_cell(r.compile_s, '.0f')} "
                       f"| {r.error or ''} |")
        out.append("")
    out += ["## Ours / the faster peer", "", *(ratios(bench.rows) or ["- (no setting measured both)"]), ""]
    out += ["## Notes", "", *(f"- {n}" for n in bench.notes + [f"skipped: {s}" for s in bench.skipped]), ""]
    return "\n".join(out)


def versions() -> str:
    found = [f"torch {torch.__version__}"]
    for name in ("transformers", "timm"):
        try:
            found.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception as e:  # timm may fail to import with errors other than ImportError
            found.append(f"{name} unavailable ({type(e).__name__})")
    return ", ".join(found)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (only with --tiny)")
    p.add_argument("--tiny", action="store_true", help="R14x0.5 at 32 px, batch 2: a smoke run of every code path")
    p.add_argument("--budget-s", type=float, default=330.0, help="stop starting new parts after this (default 330)")
    p.add_argument("--out", type=Path, default=HERE / "RESULTS-gpu.md", help="Markdown results file")
    p.add_argument("--log", type=Path, help="raw JSON-lines log (default benchmarks/logs/gpu-<time>.jsonl)")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False); this benchmark needs a GPU. "
              "For a smoke run on the CPU: --device cpu --tiny", file=sys.stderr)
        return 2
    if not args.device.startswith("cuda") and not args.tiny:
        print("bench_gpu: --device cpu only with --tiny (the full plan is sized for a GPU)", file=sys.stderr)
        return 2
    plan = tiny_plan(args.device, args.budget_s) if args.tiny else Plan(args.device, budget_s=args.budget_s)
    log = args.log or HERE / "logs" / time.strftime("gpu-%Y%m%d-%H%M%S.jsonl")
    log.parent.mkdir(parents=True, exist_ok=True)
    device = torch.device(plan.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = bf16_peak(device)
    header = [f"- Device: **{name}**; published dense bf16 peak: "
              f"{f'{peak / 1e12:.0f} TFLOP/s' if peak else 'not in the table (MFU not given)'}",
              f"- {versions()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; budget {plan.budget_s:.0f} s",
              f"- Raw log: `{log.name}`" + (" (tiny smoke run: not a measurement)" if args.tiny else "")]
    print("\n".join(header), flush=True)
    bench = Bench(plan, log)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Written after every part: a run cut short (time limit, a crash) still leaves what it measured.
    bench.on_part = lambda: write_text(args.out, markdown(bench, header))
    bench.run()
    bench.on_part()
    print("\n".join(["", *ratios(bench.rows), f"wrote {args.out} and {log}"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
