"""Which convolution kernel each layer shape runs fastest with on the machine at hand, measured and cached on disk.

The GEMM thresholds in `gemmconv.GEMM_MAX_POSITIONS` and the channels-last default were measured on one Intel
CPU; on another CPU the ranking of oneDNN's convolutions against one matrix product changes. So, as cuDNN's
benchmark mode does, the inference path times each convolution shape it meets three ways (F.conv2d on NCHW maps,
F.conv2d on channels-last maps, the GEMM path on channels-last maps) and keeps the fastest. The times are cached
as JSON per CPU model, torch version and thread count; set BIGTRANSFER_CALIBRATE=0 to skip all of it and use the
deterministic rule (GEMM_MAX_POSITIONS, channels-last).

Never slower than plain F.conv2d on the same layout, by construction: a layer goes to the GEMM path only when its
GEMM time was below its F.conv2d time on that layout, and a layout is chosen only when its total (each layer at
its chosen kernel) is the lowest.

GroupNorm (`norm_plan`): PyTorch's channels-last CPU GroupNorm is much slower than its NCHW kernel on some shapes and
dtypes (`model.normlayout`), so each GroupNorm shape on a channels-last map is timed on that kernel and through an
NCHW copy (forward only for inference, forward + backward for training), per dtype, in cache files of their own; the
copy is used where it measured clearly faster.

Training (`TrainingKernels`, used by every training loop through `engine.step.accumulate_and_step`) does the same
with forward + backward times, in a cache file of its own, on the layout the run trains in. Its choices are also
written into the run folder (RUN/kernels.json) the first time each input shape is met, and read back when the run
resumes: a resumed run runs every layer on the kernel the interrupted one used, whatever the cache holds by then,
so resuming stays exact. Evaluations inside a run keep the deterministic rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import re
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..core.atomic import write_text
from ..core.errors import UserError
from .gemmconv import ConvKey, gemm_applies, gemm_conv2d, kernel_choices, recording_convs
from .normlayout import NormKey, group_norm_via_nchw, norm_layouts, recording_norms

ENV = "BIGTRANSFER_CALIBRATE"
FORMAT = 1
CANDIDATES = ("nchw", "cl", "gemm")  # gemm: on channels-last maps; None where it does not apply (nchw: not timed
# for training, which keeps its channels-last layout)
NORM_CANDIDATES = ("cl", "nchw")  # GroupNorm of a channels-last map: its own kernel, or through an NCHW copy
# The copy must measure at least this much faster: timed alone it does not show the cache its two copies evict for
# the layers around it, and a near tie is not worth a layout change.
NCHW_MARGIN = 0.9
# Timer: (the call to time, (candidate, shape)) -> seconds. The label lets a test answer without timing anything.
Timer = Callable[[Callable[[], object], tuple[str, tuple[int, ...]]], float]
Times = dict[tuple[int, ...], dict[str, float | None]]


def enabled() -> bool:
    """False when BIGTRANSFER_CALIBRATE is 0/false/no/off: the deterministic rule then decides."""
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def wall_time(fn: Callable[[], object], label: tuple[str, tuple[int, ...]], budget_s: float = 0.005, most: int = 5) -> float:
    """Best wall time of `fn` over at least 2 and at most `most` calls within about `budget_s`, after one warm-up."""
    fn()  # the first call allocates and lets oneDNN pick its kernel for the shape
    best, spent, reps = math.inf, 0.0, 0
    while reps < 2 or (spent < budget_s and reps < most):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, reps = min(best, took), spent + took, reps + 1
    return best


def measure(key: ConvKey, timer: Timer | None = None, backward: bool = False) -> dict[str, float | None]:
    """Seconds per call of this convolution shape with each candidate kernel (random fp32 data): forward only, or
    with `backward` forward + backward (gradients of the input and the kernel)."""
    timer = timer or wall_time
    n, cin, h, w, cout, k, stride, pad = key
    x = torch.randn(n, cin, h, w)
    weight = torch.randn(cout, cin, k, k)
    x_cl, w_cl = (t.contiguous(memory_format=torch.channels_last).requires_grad_(backward) for t in (x, weight))
    out = (n, cout, (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1)
    grad_cl = torch.randn(out).contiguous(memory_format=torch.channels_last)
    grad = grad_cl.contiguous()

    def call(conv: Callable[[], torch.Tensor], g: torch.Tensor, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
        # autograd.grad, not .backward(): repeated calls would add into .grad, a pass that a training step (whose
        # .grad starts empty) does not make.
        return (lambda: torch.autograd.grad(conv(), inputs, g)) if backward else conv

    calls = {"cl": call(lambda: F.conv2d(x_cl, w_cl, None, stride, pad), grad_cl, (x_cl, w_cl))}
    if not backward:  # training keeps the run's layout (channels-last, where the GEMM applies): NCHW is no candidate
        calls["nchw"] = call(lambda: F.conv2d(x, weight, None, stride, pad), grad, (x, weight))
    if gemm_applies(x_cl, w_cl, pad):
        calls["gemm"] = call(lambda: gemm_conv2d(x_cl, w_cl, stride, pad), grad_cl, (x_cl, w_cl))
    with torch.set_grad_enabled(backward):
        return {"nchw": None, "gemm": None} | _interleaved(calls, key, timer)


def _interleaved(calls: Mapping[str, Callable[[], object]], key: tuple[int, ...], timer: Timer) -> dict[str, float]:
    """Each candidate's best time over two rounds in opposite orders: a slow moment of the machine then hits every
    candidate, not one (the choice is cached for good, and a wrong one can cost 2-10x on a large shape)."""
    best = dict.fromkeys(calls, math.inf)
    for name in (*calls, *reversed(calls)):
        best[name] = min(best[name], timer(calls[name], (name, key)))
    return best


@dataclass(frozen=True)
class Plan:
    """The layout of the whole model and, per convolution shape, whether it runs as a GEMM."""

    channels_last: bool
    gemm: dict[ConvKey, bool]
    seconds: float  # the convolutions' summed time under this plan, per forward pass


def _layer_time(t: Mapping[str, float | None], channels_last: bool) -> tuple[float, bool]:
    """(time, use GEMM) of one layer on one layout: the GEMM only where it measured faster than F.conv2d. NCHW
    unmeasured (training's times) never wins."""
    if not channels_last:
        return (math.inf if t["nchw"] is None else t["nchw"]), False
    gemm = t["gemm"]
    if gemm is not None and gemm < t["cl"]:  # type: ignore[operator]
        return gemm, True
    return t["cl"], False  # type: ignore[return-value]


def choose(counts: Mapping[ConvKey, int], times: Times, layouts: Iterable[bool] = (True, False)) -> Plan:
    """The fastest plan among `layouts` (True: channels-last), each layer at its faster kernel on that layout."""
    best: Plan | None = None
    for channels_last in layouts:  # first listed wins a tie: channels-last, the measured default
        total, gemm = 0.0, {}
        for key, count in counts.items():
            seconds, gemm[key] = _layer_time(times[key], channels_last)
            total += count * seconds
        if best is None or total < best.seconds:
            best = Plan(channels_last, gemm, total)
    if best is None:
        raise ValueError("choose() needs at least one layout")
    return best


def machine() -> dict[str, str | int]:
    """What the cached times are valid for: CPU model, torch version, thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            found = re.search(r"model name\s*:\s*(.*)", f.read())
        cpu = found.group(1).strip() if found else cpu
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads()}


def cache_file(info: Mapping[str, str | int] | None = None, backward: bool = False, kind: str = "conv") -> Path:
    """The cache file for this machine (convolutions' forward-only or forward + backward times; `kind`
    "norm-<dtype>": GroupNorm times), under the download cache ($BIGTRANSFER_CACHE or ~/.cache/bigtransfer)."""
    # Imported here: downloads pulls in tqdm and the registry, which the inference path otherwise doesn't need.
    from .downloads import cache_dir

    digest = hashlib.sha256(json.dumps(info or machine(), sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"{kind}-{'train-' if backward else ''}{digest}.json"


# What a cache holds per shape: the key's length, the candidates, and those that may be None (not timed).
CONV_ENTRIES = (8, CANDIDATES, ("gemm", "nchw"))
NORM_ENTRIES = (5, NORM_CANDIDATES, ())


def _parse_times(doc: object, info: Mapping[str, str | int],
                 entries: tuple[int, tuple[str, ...], tuple[str, ...]] = CONV_ENTRIES) -> Times:
    """The times in a cache document; ValueError naming the first problem (it is data only, never code)."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("times"), dict):
        raise ValueError(f"not a format-{FORMAT} calibration file")
    if doc.get("machine") != dict(info):
        raise ValueError("it was measured on another machine, torch version or thread count")
    length, candidates, optional = entries
    times: Times = {}
    for text, entry in doc["times"].items():
        key = tuple(int(v) for v in text.split(",")) if re.fullmatch(rf"\d+(,\d+){{{length - 1}}}", text) else None
        if key is None or not isinstance(entry, dict) or set(entry) != set(candidates):
            raise ValueError(f"bad entry {text!r}")
        for name, value in entry.items():
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0
            if not ok and not (name in optional and value is None):
                raise ValueError(f"bad time {value!r} for {name} in entry {text!r}")
        times[key] = {name: None if v is None else float(v) for name, v in entry.items()}
    return times


def load(path: Path, info: Mapping[str, str | int],
         entries: tuple[int, tuple[str, ...], tuple[str, ...]] = CONV_ENTRIES) -> Times:
    """Cached times from `path`; a missing file gives none, a damaged or foreign one is ignored with a warning."""
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # no cache yet (or no folder where it would be)
        return {}
    except (OSError, UnicodeDecodeError) as e:
        warnings.warn(f"{path}: cannot read the kernel calibration cache ({e}); measuring again", stacklevel=2)
        return {}
    try:
        return _parse_times(json.loads(text), info, entries)
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError is a ValueError; RecursionError: deep nesting
        warnings.warn(f"{path}: ignoring the kernel calibration cache ({e}); measuring again", stacklevel=2)
        return {}


def save(path: Path, info: Mapping[str, str | int], times: Times) -> None:
    """Write the times atomically; a cache that cannot be written only costs a new calibration next time."""
    doc = {"format": FORMAT, "machine": dict(info),
           "times": {",".join(map(str, key)): value for key, value in sorted(times.items())}}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, json.dumps(doc, indent=1))
    except OSError as e:
        warnings.warn(f"{path}: cannot write the kernel calibration cache ({e})", stacklevel=2)


def plan(keys: Iterable[ConvKey], layouts: Iterable[bool] = (True, False), timer: Timer | None = None,
         backward: bool = False) -> Plan:
    """The plan for one forward pass (with `backward`: forward + backward) that runs the convolutions `keys` (with
    repeats): cached times, the missing shapes measured now and added to the cache."""
    counts = Counter(keys)
    info = machine()
    times = cached_times(cache_file(info, backward), info, CONV_ENTRIES, counts,
                         lambda key: measure(key, timer, backward))
    return choose(counts, times, tuple(layouts))


def cached_times(path: Path, info: Mapping[str, str | int], entries: tuple[int, tuple[str, ...], tuple[str, ...]],
                 keys: Iterable[tuple[int, ...]], measure_one: Callable[[tuple[int, ...]], dict[str, float | None]]
                 ) -> Times:
    """The cache at `path` with every shape of `keys` in it: those missing measured now and the file rewritten."""
    times = load(path, info, entries)
    missing = [key for key in dict.fromkeys(keys) if key not in times]
    for key in missing:
        times[key] = measure_one(key)
    if missing:
        save(path, info, times)
    return times


def measure_norm(key: NormKey, dtype: torch.dtype, timer: Timer | None = None,
                 backward: bool = False) -> dict[str, float | None]:
    """Seconds per call of GroupNorm on a channels-last map of this shape and dtype: its own kernel ("cl") and
    through an NCHW copy ("nchw", both copies counted); with `backward`, forward + backward (gradients of the input
    and of the float32 parameters, as in an autocast run)."""
    timer = timer or wall_time
    n, c, h, w, groups = key
    x = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_(backward)
    weight, bias = (torch.randn(c).to(torch.float32 if backward else dtype).requires_grad_(backward) for _ in "wb")
    grad = torch.randn(n, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last)

    def call(norm: Callable[..., torch.Tensor]) -> Callable[[], object]:
        run = lambda: norm(x, groups, weight, bias, 1e-5)  # noqa: E731
        return (lambda: torch.autograd.grad(run(), (x, weight, bias), grad)) if backward else run

    calls = {"cl": call(F.group_norm), "nchw": call(group_norm_via_nchw)}
    with torch.set_grad_enabled(backward):
        return _interleaved(calls, key, timer)  # type: ignore[return-value]


def norm_plan(keys: Iterable[NormKey], dtype: torch.dtype, timer: Timer | None = None,
              backward: bool = False) -> frozenset[NormKey]:
    """The GroupNorm shapes (of `keys`) that run faster through an NCHW copy, in `dtype` on this machine (with
    `backward`: forward + backward): cached times, the missing shapes measured now and added to the cache."""
    keys = list(keys)
    name = str(dtype).removeprefix("torch.")
    info = {**machine(), "dtype": name}  # in the file's own check too, not only in its name
    times = cached_times(cache_file(info, backward, kind=f"norm-{name}"), info, NORM_ENTRIES, keys,
                         lambda key: measure_norm(key, dtype, timer, backward))  # type: ignore[arg-type]
    return frozenset(k for k in keys if times[k]["nchw"] < NCHW_MARGIN * times[k]["cl"])  # type: ignore[operator]


# The kernels one input shape runs with: per convolution shape GEMM or not (None: the shape rule), and the GroupNorm
# shapes that run through an NCHW copy. RULE: nothing measured (the shape rule, channels-last GroupNorms).
KernelPlan = tuple[dict[ConvKey, bool] | None, frozenset[NormKey]]
RULE: KernelPlan = (None, frozenset())


@contextlib.contextmanager
def in_force(kernels: KernelPlan, backward: bool = False) -> Iterator[None]:
    """Inside: convolutions and GroupNorms run on the kernels `kernels` names (with `backward`: the choices for
    calls a backward follows); the inference path and every training step enter it."""
    gemm, norms = kernels
    with kernel_choices(gemm, backward=backward), norm_layouts(norms):
        yield


# RUN/kernels.json's format: 2 added the GroupNorm choices ("norms"). A reader refuses a format it does not know,
# rather than resume with fewer choices than the run trained with.
RUN_FORMAT = 2


class TrainingKernels:
    """The calibrated kernels of a training run, per input shape, kept in RUN/kernels.json.

    `for_input(model, x)`, before micro-batch `x`'s forward pass (and `in_force` around it and its backward): for a
    new input shape, one forward pass without gradients records the model's convolutions and GroupNorms;
    `plan(..., backward=True)` chooses between oneDNN and the GEMM for each convolution (fp32 runs: the GEMM path
    computes fp32 only) and `norm_plan(..., backward=True)` between GroupNorm's channels-last kernel and an NCHW
    copy (in the run's compute dtype); the choices are saved. Nothing is chosen where there is nothing to choose
    (not channels-last on a CPU: the model's first kernel tells) or where measuring is off (`measure` False, which
    the loop passes for torchrun runs, or BIGTRANSFER_CALIBRATE=0 when the run started): the shape rule and
    channels-last GroupNorms, saved too. A resumed run (`keep`) follows the file, whatever the environment says
    now; a run saved before the file existed keeps the shape rule, one saved before it held GroupNorm choices
    keeps channels-last GroupNorms.
    """

    def __init__(self, path: Path | None, keep: bool = True, timer: Timer | None = None, measure: bool = True,
                 dtype: torch.dtype = torch.float32) -> None:
        """`path`: the run's kernels.json (None: nothing saved); `keep`: reuse its choices (a resumed run); `dtype`:
        what the run computes in (its autocast dtype, else float32)."""
        self.path, self.timer, self.dtype = path, timer, dtype
        self.measure = measure and enabled()
        self.plans: dict[tuple[int, ...], KernelPlan] = {}
        if path is not None and keep:
            if path.exists():
                self.plans, self.measure = self._read(), False
            else:  # a state saved by a version that always trained by the shape rule
                self.measure = False

    def _read(self) -> dict[tuple[int, ...], KernelPlan]:
        assert self.path is not None

        def ints(v: object, n: int) -> list[int]:
            if not isinstance(v, list) or len(v) != n or not all(type(i) is int and i >= 0 for i in v):
                raise ValueError(f"expected {n} integers >= 0, got {v!r}")
            return v

        def entry(e: dict) -> tuple[tuple[int, ...], KernelPlan]:
            shape, convs = tuple(ints(e["input"], 4)), e["convs"]
            norms = frozenset(tuple(ints(k, 5)) for k in e.get("norms", []))  # absent: saved before they existed
            if convs is None:
                return shape, (None, norms)  # type: ignore[return-value]
            rows = [ints(c, 9) for c in convs]
            if any(r[8] > 1 for r in rows):
                raise ValueError("a choice is not 0 or 1")
            return shape, ({tuple(r[:8]): bool(r[8]) for r in rows}, norms)  # type: ignore[return-value]

        written: object = None
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            written = doc.get("format", 1)  # files without a number: the first version (convolutions only)
            if type(written) is int and written in (1, RUN_FORMAT):
                return dict(entry(e) for e in doc["plans"])
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as e:
            raise UserError(f"{self.path}: not a kernel choice file of a run ({e}); delete it to resume with the "
                            "kernels measured now (the resumed run then differs by float rounding)") from None
        raise UserError(f"{self.path}: kernel choice format {written!r}, which this version does not know (it reads "
                        f"1 and {RUN_FORMAT}): resume the run with the bigtransfer that wrote it")

    def _write(self) -> None:
        if self.path is None:
            return
        plans = [{"input": list(shape),
                  "convs": None if gemm is None else [[*key, int(g)] for key, g in sorted(gemm.items())],
                  "norms": sorted(map(list, norms))} for shape, (gemm, norms) in sorted(self.plans.items())]
        write_text(self.path, json.dumps({"format": RUN_FORMAT, "plans": plans}))

    def for_input(self, model: torch.nn.Module, x: torch.Tensor) -> KernelPlan:
        """The kernels micro-batch `x` runs with (measured and saved the first time its shape is met)."""
        shape = tuple(x.shape)
        if shape not in self.plans:
            self.plans[shape] = self._measure(model, x) if self.measure else RULE
            self._write()
        return self.plans[shape]

    def _measure(self, model: torch.nn.Module, x: torch.Tensor) -> KernelPlan:
        kernel = next((p for p in model.parameters() if p.dim() == 4), None)
        # Choices exist for channels-last models on a CPU only; elsewhere F.conv2d and GroupNorm's own kernel.
        if (kernel is None or x.device.type != "cpu" or kernel.is_contiguous()
                or not kernel.is_contiguous(memory_format=torch.channels_last)):
            return RULE
        with torch.no_grad(), recording_convs() as convs, recording_norms() as norms:
            model(x)
        # The GEMM path computes fp32 only: an autocast run keeps F.conv2d (the shape rule leaves it there).
        gemm = plan(convs, (True,), self.timer, backward=True).gemm if self.dtype is torch.float32 else None
        return gemm, norm_plan(norms, self.dtype, self.timer, backward=True)
