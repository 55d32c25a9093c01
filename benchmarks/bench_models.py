"""Model speed: inference and training-step images/s and peak memory, ours against HF transformers' BiT.

Every peer holds exactly our model's weights (copied through bigtransfer.model.checkpoints' key maps) and sees the
same input tensor. Candidates run interleaved in one process (round r times every candidate once), so machine
noise from other processes hits all of them alike; each figure is the median over rounds. Peak training memory
is measured in a fresh subprocess per candidate (Linux VmHWM, reset after the model is built, so it counts
activations, gradients, optimizer state and workspace, not the weights or the imports). The machine's limit is
measured here too: GFLOP/s of a large fp32 and bf16 matmul.

Run: `make bench` (= `--quick --no-memory`: R50x1 inference 224 px batch 8 and a training step at 128 px, ours
against HF transformers and onnxruntime on our export, with issue 14's targets; a few minutes), the default subset
(about 10 minutes), `--full` (every combination of
R50x1/R101x1, 128/224 px, batch 1/8, fp32/bf16), `--profile` (torch.profiler op tables for the headline configs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from bigtransfer.core.errors import UserError
from bigtransfer.deploy.engines import OnnxRuntimeRunner
from bigtransfer.deploy.inference_model import PRECISIONS, InferenceModel, prepare_for_inference
from bigtransfer.engine.device import sgd
from bigtransfer.model import gemmconv, kernelcal, normlayout
from bigtransfer.model.resnetv2 import ResNetV2

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import PEER_WS_EPS, hf_bit, hf_logits, timm_available, timm_bit  # noqa: E402

Step = Callable[[], object]


@dataclass(frozen=True)
class Config:
    """One benchmarked setting."""

    mode: str  # "infer" or "train"
    arch: str
    size: int
    batch: int
    precision: str  # "fp32" or "bf16"

    @property
    def label(self) -> str:
        return f"{self.mode} {self.arch} {self.size}px b{self.batch} {self.precision}"


DEFAULT = [
    Config("infer", "R50x1", 224, 8, "fp32"),
    Config("infer", "R50x1", 224, 8, "bf16"),
    Config("infer", "R50x1", 128, 1, "fp32"),
    Config("infer", "R101x1", 224, 8, "fp32"),
    Config("train", "R50x1", 128, 8, "fp32"),
]
QUICK = [Config("infer", "R50x1", 224, 8, "fp32"), Config("train", "R50x1", 128, 8, "fp32")]
HEADLINE = [Config("infer", "R50x1", 224, 8, "fp32"), Config("train", "R50x1", 128, 8, "fp32")]


def full_matrix() -> list[Config]:
    """Every combination the issue lists."""
    return [Config(mode, arch, size, batch, prec) for mode in ("infer", "train") for arch in ("R50x1", "R101x1")
            for size in (128, 224) for batch in (1, 8) for prec in ("fp32", "bf16")]


def parse_config(text: str) -> Config:
    """'infer:R50x1:224:8:fp32' -> Config."""
    try:
        mode, arch, size, batch, precision = text.split(":")
        cfg = Config(mode, arch, int(size), int(batch), precision)
    except ValueError as e:
        raise SystemExit(f"bad config {text!r}: expected MODE:ARCH:SIZE:BATCH:PRECISION ({e})") from e
    if mode not in ("infer", "train") or precision not in ("fp32", "bf16"):
        raise SystemExit(f"bad config {text!r}: mode is infer or train, precision fp32 or bf16")
    return cfg


# ---------------------------------------------------------------- the machine

def matmul_gflops(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    """Best GFLOP/s of an n x n matmul in `dtype` (the machine's practical matrix-unit limit)."""
    a, b, c = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype), torch.empty(n, n, dtype=dtype)
    start = time.perf_counter()
    while time.perf_counter() - start < 1.0:  # the first calls run measurably slower (clocks, thread pool)
        torch.matmul(a, b, out=c)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


class OtherLoad:
    """Average CPU cores used by everything except this process over a window (from /proc/stat)."""

    def __enter__(self) -> OtherLoad:
        self._start = (self._busy_s(), self._own_s(), time.perf_counter())
        return self

    def __exit__(self, *exc) -> None:
        busy, own, t = self._start
        self.cores = max(0.0, (self._busy_s() - busy) - (self._own_s() - own)) / (time.perf_counter() - t)

    @staticmethod
    def _busy_s() -> float:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own_s() -> float:
        t = os.times()
        return t.user + t.system


def cpu_description() -> str:
    """CPU model, core count and the instruction-set flags that decide bf16 speed."""
    model, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = re.search(r"model name\s*:\s*(.*)", text).group(1)
        flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    except (OSError, AttributeError):
        pass
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile", "avx512_fp16"]
    have = " ".join(f"{f}:{'yes' if f in flags else 'no'}" for f in wanted)
    return f"{model}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}; {have}"


def flops_per_image(arch: str, size: int) -> float:
    """Forward FLOPs for one image (convolutions and head), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = ResNetV2(arch, 1000)
        x = torch.zeros(1, 3, size, size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    return float(counter.get_total_flops())


# ---------------------------------------------------------------- candidates

def our_model(arch: str, seed: int = 0) -> ResNetV2:
    """Our model with non-trivial random weights (the same for the same seed), 1000 classes."""
    torch.manual_seed(seed)
    return ResNetV2(arch, 1000, ws_eps=PEER_WS_EPS, zero_head=False).eval()


def make_models(arch: str, seed: int = 0) -> tuple[ResNetV2, torch.nn.Module]:
    """Our model and HF's BiT holding the same weights."""
    ours = our_model(arch, seed)
    return ours, hf_bit(ours)


def _autocast(precision: str) -> Callable[[], object]:
    return (lambda: torch.autocast("cpu", dtype=PRECISIONS[precision])) if precision != "fp32" else nullcontext


def inference_candidates(cfg: Config, ours: ResNetV2, hf: torch.nn.Module, x: torch.Tensor,
                         compile: bool) -> dict[str, Step]:
    """name -> a callable running one forward pass of `x`."""
    ctx = _autocast(cfg.precision)
    hf_fn = hf_logits(hf)

    def eager(fn):
        def step():
            with torch.no_grad(), ctx():
                return fn(x)
        return step

    cands = {"hf": eager(hf_fn), "ours": eager(ours)}
    if timm_available():
        cands["timm"] = eager(timm_bit(ours))
    # Calibrated on its first call, as a user's first batch is (bigtransfer.model.kernelcal): made here, before the
    # ablations below switch parts of its dispatch off.
    fast = prepare_for_inference(ours, cfg.precision)
    fast(x)
    cands["ours-fast"] = lambda: fast(x)
    if cfg.precision == "fp32":
        ort = onnxruntime_candidate(ours)
        if ort is not None:
            cands["onnxruntime"] = lambda: ort(x)
    # Ablations: the same fast path with every convolution left to oneDNN (no GEMM path), and with every GroupNorm
    # on its channels-last kernel (none through an NCHW copy, whatever the measurement said).
    cands["ours-fast-nogemm"] = without_gemm(lambda: fast(x))
    clnorm = with_channels_last_norms(prepare_for_inference(ours, cfg.precision), x)
    cands["ours-fast-clnorm"] = lambda: clnorm(x)
    if compile:
        fast_c = prepare_for_inference(ours, cfg.precision, compile=True)
        cands["ours-fast-compile"] = lambda: fast_c(x)
    return cands


def onnxruntime_candidate(ours: ResNetV2) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """onnxruntime on our own ONNX export (the --engine onnxruntime of predict/embed), or None if not installed."""
    try:
        return OnnxRuntimeRunner(ours, features=False)
    except UserError as e:
        print(f"  (no onnxruntime candidate: {e})")
        return None


def without_gemm(step: Step) -> Step:
    """`step` with bigtransfer.model.gemmconv's GEMM path switched off for its duration (rule and calibration)."""
    def run():
        saved = gemmconv.prefers_gemm
        gemmconv.prefers_gemm = lambda *args: False
        try:
            return step()
        finally:
            gemmconv.prefers_gemm = saved
    return run


def with_channels_last_norms(fast: InferenceModel, x: torch.Tensor) -> InferenceModel:
    """`fast`, calibrated on `x`, with its frozen copy's GroupNorms made plain nn.GroupNorms again: all on the
    channels-last kernel, whatever the measurement chose (a copy of its own, so `ours-fast` is untouched)."""
    fast(x)
    for m in fast.frozen.modules():
        if type(m) is normlayout.LayoutGroupNorm:
            m.__class__ = torch.nn.GroupNorm
    return fast


def train_step(model: torch.nn.Module, forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
               y: torch.Tensor, precision: str, channels_last: bool = False) -> Step:
    """A callable doing one SGD-momentum step (forward, cross-entropy, backward, update) on (x, y)."""
    model.train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    # Every candidate updates with the training loops' optimizer (PyTorch's fused SGD): a peer's user can have it too.
    opt = sgd(model.parameters(), torch.device("cpu"), lr=1e-3, momentum=0.9)
    ctx = _autocast(precision)

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = F.cross_entropy(forward(x).float(), y)
        loss.backward()
        opt.step()
        return loss

    return step


def training_models(arch: str, which: list[str]) -> dict[str, tuple[torch.nn.Module, Callable]]:
    """name -> (model, forward) for the training candidates, all with the same starting weights."""
    out: dict[str, tuple[torch.nn.Module, Callable]] = {}
    for name in which:
        ours = our_model(arch)
        if name == "hf":
            hf = hf_bit(ours)
            out[name] = (hf, hf_logits(hf))
        elif name == "timm":
            t = timm_bit(ours)
            out[name] = (t, t)
        else:
            if name == "ours-ckpt":
                ours.set_grad_checkpointing(True)
            out[name] = (ours, ours)
    return out


def with_training_kernels(step: Step, model: torch.nn.Module, x: torch.Tensor, precision: str) -> Step:
    """`step` with each convolution and GroupNorm on the kernel measured faster for its forward + backward (the
    training loops' `kernelcal.TrainingKernels`; the first call measures the shapes the machine's cache lacks)."""
    kernels = kernelcal.TrainingKernels(None, dtype=PRECISIONS[precision])

    def run():
        with kernelcal.in_force(kernels.for_input(model, x), backward=True):
            return step()
    return run


# Our training candidates: "ours" is the model as bigtransfer's fine-tuning, distillation and pre-training loops
# train it (channels-last, each convolution on its measured kernel); the others take one of those choices away
# ("ours-rule": the fixed GEMM_MAX_POSITIONS rule and channels-last GroupNorms instead of the measurements), or add
# activation checkpointing.
TRAIN_CANDIDATES = ["hf", "ours", "ours-rule", "ours-nchw", "ours-nogemm", "ours-ckpt"]
NCHW_CANDIDATES = ("hf", "timm", "ours-nchw")


def candidate_step(name: str, model: torch.nn.Module, forward: Callable, x: torch.Tensor, y: torch.Tensor,
                   precision: str) -> Step:
    """The training step of candidate `name`, in its memory layout and with its kernel choices."""
    step = train_step(model, forward, x, y, precision, channels_last=name not in NCHW_CANDIDATES)
    if name == "ours-nogemm":
        return without_gemm(step)
    if name in ("ours", "ours-ckpt"):
        return with_training_kernels(step, model, x, precision)
    return step


def train_candidates(cfg: Config, x: torch.Tensor, y: torch.Tensor) -> dict[str, Step]:
    """name -> a callable doing one training step."""
    names = TRAIN_CANDIDATES + (["timm"] if timm_available() else [])
    models = training_models(cfg.arch, names)
    return {name: candidate_step(name, m, fwd, x, y, cfg.precision) for name, (m, fwd) in models.items()}


# ---------------------------------------------------------------- timing and memory

def interleaved_median(cands: dict[str, Step], rounds: int, min_sample_s: float = 0.3) -> dict[str, list[float]]:
    """Seconds per call of each candidate, per round, timed round-robin so load changes hit all alike.

    Each sample times enough back-to-back calls to last about `min_sample_s` (the same count for every
    candidate), so short calls are not dominated by timer and scheduler noise.
    """
    warm: dict[str, float] = {}
    for _ in range(2):
        for name, fn in cands.items():
            t = time.perf_counter()
            fn()
            warm[name] = time.perf_counter() - t
    calls = max(1, round(min_sample_s / min(warm.values())))
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for name, fn in cands.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t) / calls)
    return times


def _proc_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


def child_peak_memory(cfg: Config, name: str, steps: int = 3) -> dict[str, float]:
    """(In a fresh process) peak resident memory of training steps above the built model, in MiB."""
    import transformers  # noqa: F401  # every child imports the same modules, so absolute peaks compare too

    torch.manual_seed(0)
    x = torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1
    y = torch.randint(0, 1000, (cfg.batch,))
    ((model, fwd),) = training_models(cfg.arch, [name]).values()
    step = candidate_step(name, model, fwd, x, y, cfg.precision)
    import gc

    gc.collect()
    base = _proc_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    for _ in range(steps):
        step()
    return {"peak_mib": _proc_kib("VmHWM") / 1024, "above_model_mib": (_proc_kib("VmHWM") - base) / 1024}


def peak_memory(cfg: Config, name: str, runs: int = 2) -> dict[str, float]:
    """child_peak_memory in fresh interpreters (one candidate's allocations can't hide another's); the lowest
    of `runs`, since allocator timing only ever adds to a peak."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child-memory", json.dumps([asdict(cfg), name])]
    results = [json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
               for _ in range(runs)]
    return min(results, key=lambda r: r["above_model_mib"])


def saved_activation_mib(cfg: Config, name: str) -> float:
    """MiB of distinct non-parameter tensors autograd keeps for backward in one training step (exact)."""
    from torch.autograd.graph import saved_tensors_hooks

    ((model, fwd),) = training_models(cfg.arch, [name]).values()
    torch.manual_seed(0)
    x = torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1
    y = torch.randint(0, 1000, (cfg.batch,))
    step = candidate_step(name, model, fwd, x, y, cfg.precision)  # in the candidate's layout and GEMM setting
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(kept.values()) / 2**20


def profile_table(step: Step, rows: int = 12) -> str:
    """torch.profiler's self-CPU-time table for one call."""
    from torch.profiler import ProfilerActivity, profile

    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


# ---------------------------------------------------------------- the targets

# (mode, precision) -> (the peers ours is compared with, the least ratio to the fastest, the least fraction of the
# measured matmul limit): issue 14's targets.
TARGETS = {("infer", "fp32"): ("ours-fast", ("hf", "timm", "onnxruntime"), 1.0, 0.80),
           ("train", "fp32"): ("ours", ("hf", "timm"), 1.2, 0.65)}


def targets(rows: list[dict]) -> list[str]:
    """One line per config that has a target: ours / the fastest peer, and ours' fraction of the matmul limit."""
    lines = []
    for label in dict.fromkeys(Config(**r["config"]).label for r in rows):
        same = {r["candidate"]: r for r in rows if Config(**r["config"]).label == label}
        cfg = Config(**next(iter(same.values()))["config"])
        target = TARGETS.get((cfg.mode, cfg.precision))
        if target is None or target[0] not in same:
            continue
        name, peer_names, least_ratio, least_limit = target
        ours = same[name]
        peers = [same[p] for p in peer_names if p in same]
        peer = max(peers, key=lambda r: r["images_per_s"])
        ratio = ours["images_per_s"] / peer["images_per_s"]
        ok = ratio >= least_ratio and ours["of_limit"] >= least_limit
        lines.append(f"- {label}: {name} {ours['images_per_s']:.2f} images/s = {ratio:.2f}x the fastest peer "
                     f"({peer['candidate']} {peer['images_per_s']:.2f}; target {least_ratio}x) and "
                     f"{ours['of_limit']:.0%} of the {ours['limit']:.0f} GFLOP/s matmul limit (target "
                     f"{least_limit:.0%}): {'met' if ok else 'NOT met'}")
        bound = ours.get("conv_bound_s")
        if bound is not None:
            lines.append(f"  ceiling: its convolutions alone reach {ours['conv_bound_of_limit']:.0%} of the limit "
                         f"(every other op free); the rest of the step takes {1 - bound / (ours['ms'] / 1e3):.0%} "
                         "of its time")
    return lines or ["- (no config with a target ran: the targets are for fp32 inference and training)"]


def conv_bound_seconds(cfg: Config, x: torch.Tensor) -> float | None:
    """Seconds per batch of the model's convolutions alone, as kernelcal plans them (the faster layout, each shape
    on its faster kernel there, timed in isolation and warm; forward + backward for training; cached by the
    candidates' first calls): what no candidate on these kernels beats however little its other ops cost. None
    where kernelcal does not time convolutions (bf16)."""
    if cfg.precision != "fp32":
        return None
    with torch.no_grad(), gemmconv.recording_convs() as seen:
        our_model(cfg.arch)(x)
    layouts = (True, False) if cfg.mode == "infer" else (True,)  # training keeps channels-last
    return kernelcal.plan(seen, layouts, backward=cfg.mode == "train").seconds


def report_conv_bound(cfg: Config, x: torch.Tensor, rows: list[dict], gflop: float, limit: float) -> None:
    """Print the convolutions' ceiling (`conv_bound_seconds`) and add it to the config's rows."""
    bound = conv_bound_seconds(cfg, x)
    if bound is None:
        return
    ips = cfg.batch / bound
    print(f"\nconvolutions alone, on kernelcal's kernels and layout: {bound * 1e3:.0f} ms/batch = {ips:.2f} images/s "
          f"= {ips * gflop / limit:.0%} of the matmul limit (the ceiling of any candidate on these kernels)")
    for row in rows:
        row.update(conv_bound_s=bound, conv_bound_of_limit=ips * gflop / limit)


def warn_if_loaded(other_cores: float | None = None) -> None:
    """Say so when other processes compete for the cores: then the figures say little about the code."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    if load > 0.5 * cores or (other_cores or 0.0) > 0.25 * cores:
        during = f"; other processes used up to {other_cores:.2f} cores during the timings" if other_cores else ""
        print(f"WARNING: the machine is busy (load average {load:.2f} on {cores} cores{during}): these figures are "
              "not a measurement of the code alone")


# ---------------------------------------------------------------- the run

def run_config(cfg: Config, rounds: int, limits: dict[str, list[float]], compile: bool, memory: bool,
               profile: bool) -> list[dict]:
    """Time (and for training, measure memory of) every candidate on one config; print a table."""
    torch.manual_seed(0)
    x = torch.rand(cfg.batch, 3, cfg.size, cfg.size) * 2 - 1
    if cfg.mode == "infer":
        ours, hf = make_models(cfg.arch)
        with torch.no_grad():
            ref = hf_logits(hf)(x)
            agree = (ours(x) - ref).abs().max().item() / ref.abs().max().item()
        print(f"  same weights: max |ours - hf| / max |hf| = {agree:.1e}")
        cands = inference_candidates(cfg, ours, hf, x, compile)
        if cfg.precision == "fp32":
            with torch.no_grad():
                plain = ours(x)
            fast_err = (cands["ours-fast"]() - plain).abs().max().item() / plain.abs().max().item()
            print(f"  fast path: max |ours-fast - ours| / max |ours| = {fast_err:.1e} (required: < 1e-4)")
        gflop = flops_per_image(cfg.arch, cfg.size) / 1e9
    else:
        y = torch.randint(0, 1000, (cfg.batch,))
        cands = train_candidates(cfg, x, y)
        gflop = 3 * flops_per_image(cfg.arch, cfg.size) / 1e9  # backward costs about twice the forward
    # This VM's throughput drifts by +-20% with its host's load: measure the limit next to each config.
    limit = matmul_gflops(PRECISIONS[cfg.precision])
    limits.setdefault(cfg.precision, []).append(limit)
    with OtherLoad() as other:
        samples = interleaved_median(cands, rounds)
    secs = {k: statistics.median(v) for k, v in samples.items()}
    rows = []
    print(f"\n### {cfg.label}\n\n{gflop:.2f} GFLOP/image; median of {rounds} rounds; {cfg.precision} matmul limit "
          f"measured just before: {limit:.0f} GFLOP/s; other processes used {other.cores:.2f} cores meanwhile.\n")
    head = "| candidate | ms/batch | images/s | vs hf | GFLOP/s | of matmul limit | best round images/s |"
    if cfg.mode == "train" and memory:
        head += " peak MiB | MiB above model | MiB saved for backward |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name, s in secs.items():
        ips = cfg.batch / s
        best = cfg.batch / min(samples[name])
        row = {"config": asdict(cfg), "candidate": name, "ms": s * 1e3, "images_per_s": ips,
               "vs_hf": secs["hf"] / s, "gflops": ips * gflop, "of_limit": ips * gflop / limit, "limit": limit,
               "best_images_per_s": best, "samples_s": samples[name], "other_cores": other.cores}
        line = (f"| {name} | {s * 1e3:.0f} | {ips:.2f} | {row['vs_hf']:.2f}x | {row['gflops']:.0f} "
                f"| {row['of_limit']:.0%} | {best:.2f} |")
        if cfg.mode == "train" and memory:
            mem = peak_memory(cfg, name)
            mem["saved_mib"] = saved_activation_mib(cfg, name)
            row.update(mem)
            line += f" {mem['peak_mib']:.0f} | {mem['above_model_mib']:.0f} | {mem['saved_mib']:.0f} |"
        print(line, flush=True)
        rows.append(row)
    report_conv_bound(cfg, x, rows, gflop, limit)
    if profile:
        for name in ("hf", "ours-fast" if cfg.mode == "infer" else "ours"):
            print(f"\nprofile of {name}, {cfg.label}:\n```\n{profile_table(cands[name])}\n```")
    return rows


def main(argv: list[str] | None = None) -> int:
    """Parse options, measure the machine, run the configs, print tables (and optionally write JSON)."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="R50x1 fp32 inference and training only, 3 rounds")
    g.add_argument("--full", action="store_true", help="every arch/size/batch/precision combination")
    p.add_argument("--configs", help="comma-separated MODE:ARCH:SIZE:BATCH:PRECISION, e.g. infer:R26x0.5:64:2:fp32")
    p.add_argument("--rounds", type=int, help="timed rounds per config (default 5, quick 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    p.add_argument("--compile", action="store_true", help="also time prepare_for_inference(compile=True)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", action="store_true", help="print op tables for hf and ours on each config")
    p.add_argument("--json", help="also write every row to this JSON file")
    p.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child_memory:
        cfg, name = json.loads(args.child_memory)
        print(json.dumps(child_peak_memory(Config(**cfg), name)))
        return 0

    if args.configs:
        configs = [parse_config(c) for c in args.configs.split(",")]
    else:
        configs = QUICK if args.quick else full_matrix() if args.full else DEFAULT
    rounds = args.rounds or (3 if args.quick else 5)
    print(f"machine: {cpu_description()}")
    print(f"torch {torch.__version__}, mkldnn {torch.backends.mkldnn.is_available()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    warn_if_loaded()
    limits: dict[str, list[float]] = {}
    rows = []
    for cfg in configs:
        rows += run_config(cfg, rounds, limits, args.compile, not args.no_memory, args.profile)
    for prec, vals in limits.items():
        print(f"\n{prec} matmul limit (2048^3, best of 10) over the run: {min(vals):.0f} to {max(vals):.0f} GFLOP/s")
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    print("\n".join(["", "Targets (issue 14):", *targets(rows)]))
    warn_if_loaded(max((r["other_cores"] for r in rows), default=0.0))
    if args.json:
        from bigtransfer.core.atomic import write_text

        write_text(args.json, json.dumps({"limits": limits, "machine": cpu_description(), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
