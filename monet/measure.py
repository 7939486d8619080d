"""Real peak memory and step time of a training step, on CPU and CUDA.

This is the one place where monet measures what a step really used; the
simulator's prediction (``simulate.py``) and the solver's budget are checked
against it. There is one method per device, named in every result:

* **CPU** — ``torch.profiler`` with ``profile_memory=True``. Every allocation
  and free that goes through PyTorch's CPU allocator is recorded as a
  ``[memory]`` event with its pointer and exact byte count; the peak is the
  maximum of the running sum, in time order, plus the baseline. This is exact
  for tensor memory, byte for byte, and it sees buffers that compiled
  (inductor) code allocates, which a ``TorchDispatchMode`` tracker does not.
  PyTorch 2.13 has no CPU allocator statistics, and RSS overstates and wanders
  because glibc keeps freed memory unless ``MALLOC_MMAP_THRESHOLD_`` is fixed,
  which makes steps ~3x slower (FACTS.md). So RSS serves only as a cross-check
  (:func:`rss_peak_subprocess`).
* **CUDA** — ``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``; the peak is reported as
  ``max_memory_allocated - memory_allocated at the start + baseline``, so
  that both devices mean the same thing (see below). Tensors alive at the
  start but not passed as ``resident`` are left out on both devices.

What is counted: the storages passed as ``resident`` (the baseline, each
storage once) plus every storage allocated during the step, for as long as it
lives. Storages that were alive before the step but not passed as ``resident``
are outside the accounting: their frees are ignored, so the result does not
depend on what else the process holds.

Limits:

* Only memory that goes through PyTorch's allocators: not oneDNN/MKL internal
  scratch space, Python objects, or tensors wrapping foreign memory
  (``from_numpy``, DLPack).
* The CPU allocator reports no free for a block allocated before profiling
  started, so frees of resident storages are detected with a weak reference
  on each storage that drops a marker into the trace when it dies (the
  allocator then logs "Memory block of unknown size ..."; harmless). A
  marker from a thread the profiler does not follow is lost, and a resident
  storage resized in place (``resize_``) during the step counts at both sizes.
* On CUDA, the caching allocator counts blocks rounded up to 512 bytes while
  the baseline counts storage bytes: a few hundred bytes per resident tensor.
* The profiler slows the step; time it separately with
  :func:`measure_step_time` / :func:`compare_step_times`.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
import weakref
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch._C._profiler import _EventType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._pytree import tree_leaves

from monet.quiet import quiet_fd

__all__ = [
    "MemoryMeasurement",
    "StepTime",
    "compare_step_times",
    "measure_peak_memory",
    "measure_step_time",
    "resident_tensors",
    "rss_peak_subprocess",
    "storage_bytes",
]

_FREE_MARK = "monet::resident_free#"
_START_MARK = "monet::step_start"


@dataclass(frozen=True)
class MemoryMeasurement:
    """Absolute peak of tensor memory during one step."""

    peak_bytes: int  # includes baseline_bytes
    baseline_bytes: int  # distinct resident storages on the device at the start
    method: str
    device: str
    timeline: list[tuple[float, int]] | None  # (seconds since step start, live bytes)

    @property
    def delta_bytes(self) -> int:
        """Peak above the baseline: what the step itself added at its worst."""
        return self.peak_bytes - self.baseline_bytes


@dataclass(frozen=True)
class StepTime:
    """Wall time of repeated runs of one step."""

    median_s: float
    times_s: list[float]
    method: str


# ---------------------------------------------------------------- storages


def _tensor_leaves(tensors: Iterable[object]) -> Iterable[torch.Tensor]:
    # Walk the top level by iteration (generators such as model.parameters()),
    # then nested lists/tuples/dicts with pytree.
    for item in tensors:
        for leaf in tree_leaves(item):
            if isinstance(leaf, torch.Tensor):
                yield leaf


def _storages(t: torch.Tensor) -> Iterable[tuple[object, torch.UntypedStorage | None, int]]:
    """(identity key, storage or None, bytes) for every storage behind ``t``."""
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        # Sparse tensors and storage-less wrapper subclasses: count their parts.
        if t.layout == torch.sparse_coo:
            parts = [t._indices(), t._values()]
        elif t.layout in (torch.sparse_csr, torch.sparse_bsr):
            parts = [t.crow_indices(), t.col_indices(), t.values()]
        elif t.layout in (torch.sparse_csc, torch.sparse_bsc):
            parts = [t.ccol_indices(), t.row_indices(), t.values()]
        elif hasattr(t, "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            parts = [getattr(t, n) for n in names]
        else:
            yield ("tensor", id(t)), None, t.nbytes
            return
        for p in parts:
            yield from _storages(p)
        return
    # _cdata is the StorageImpl's address: one key per live storage, shared by views.
    yield st._cdata, st, st.nbytes()


def storage_bytes(tensors: Iterable[object]) -> int:
    """Total bytes of the distinct storages among ``tensors``.

    Views of one storage count once; ``None`` and non-tensors are ignored;
    nested lists, tuples and dicts are walked. Gradients count only where
    passed (see :func:`resident_tensors`).
    """
    seen: dict[object, int] = {}
    for t in _tensor_leaves(tensors):
        for key, _, nbytes in _storages(t):
            seen.setdefault(key, nbytes)
    return sum(seen.values())


def resident_tensors(module: torch.nn.Module | None = None, *inputs: object) -> list[torch.Tensor]:
    """Parameters, buffers, existing gradients of ``module`` and the tensors in ``inputs``."""
    out: list[torch.Tensor] = []
    if module is not None:
        for p in module.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(module.buffers())
    out.extend(_tensor_leaves(inputs))
    return out


# ------------------------------------------------------------------ devices


def _resolve_device(
    device: str | torch.device | None, tensors: Sequence[torch.Tensor] = ()
) -> torch.device:
    if device is None:
        real = [t.device for t in tensors if t.device.type != "meta"]
        if real:
            device = real[0]
        elif torch.cuda.is_available() and torch.cuda.is_initialized():
            device = "cuda"
        else:
            device = "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"monet.measure supports cpu and cuda, not {dev}")
    return dev


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.type == "cpu" or a.index == b.index)


# ------------------------------------------------------------ peak memory


def _walk(events: Iterable) -> Iterable:
    for e in events:
        yield e
        yield from _walk(e.children)


def _replay(prof: profile, dev: torch.device, resident_sizes: list[int], baseline: int):
    """Peak and timeline of live bytes from the profiler's allocation events.

    A free counts only if its allocation is in the trace (or it is a resident
    storage, through its marker): the CPU allocator does report frees of
    blocks allocated under an earlier profiler session, and those are outside
    the accounting unless resident.
    """
    kineto = getattr(prof.profiler, "kineto_results", None)
    if kineto is None:
        raise RuntimeError("torch.profiler returned no kineto results; cannot read [memory] events")
    events = sorted(_walk(kineto.experimental_event_tree()), key=lambda e: e.start_time_ns)
    t0 = next((e.start_time_ns for e in events if e.name == _START_MARK), None)
    live: dict[int, int] = {}  # ptr -> bytes of blocks allocated during the step
    freed_resident: set[int] = set()
    cur = peak = baseline
    timeline: list[tuple[float, int]] = [(0.0, baseline)]
    for e in events:
        if e.tag == _EventType.Allocation:
            f = e.extra_fields
            if not _same_device(f.device, dev):
                continue
            if f.alloc_size > 0:
                live[f.ptr] = f.alloc_size
                cur += f.alloc_size
            elif f.ptr in live:
                cur -= live.pop(f.ptr)
            else:
                continue
        elif e.name.startswith(_FREE_MARK):
            i = int(e.name[len(_FREE_MARK) :])
            if i in freed_resident:
                continue
            freed_resident.add(i)
            cur -= resident_sizes[i]
        else:
            continue
        peak = max(peak, cur)
        if t0 is not None:
            timeline.append((max(0.0, (e.start_time_ns - t0) / 1e9), cur))
    return peak, timeline


def _resident_storages(
    resident: Iterable[object], device: str | torch.device | None
) -> tuple[torch.device, list[int], list[weakref.ref | None]]:
    """Device, bytes and weak references of the distinct resident storages on it.

    Only weak references leave this function, so that the step can free a
    resident storage; when one dies it drops a marker into the running trace.
    """
    tensors = list(_tensor_leaves(resident))
    dev = _resolve_device(device, tensors)
    sizes: list[int] = []
    refs: list[weakref.ref | None] = []
    seen: set[object] = set()
    for t in tensors:
        if not _same_device(t.device, dev):
            continue
        for key, st, nbytes in _storages(t):
            if key in seen:
                continue
            seen.add(key)
            ref = None
            if st is not None and nbytes > 0:
                try:
                    ref = weakref.ref(st, _free_marker(len(sizes)))
                except TypeError:  # a storage type without weak references
                    pass
            sizes.append(nbytes)
            refs.append(ref)
    return dev, sizes, refs


def _free_marker(i: int) -> Callable[[weakref.ref], None]:
    def mark(_: weakref.ref) -> None:
        # A no-op outside a profiler; inside one, an event at the moment of the free.
        with record_function(f"{_FREE_MARK}{i}"):
            pass

    return mark


def measure_peak_memory(
    step: Callable[[], object],
    resident: Iterable[object] = (),
    device: str | torch.device | None = None,
    record_timeline: bool = False,
) -> MemoryMeasurement:
    """Run ``step()`` once and return its absolute peak of tensor memory.

    ``resident``: tensors alive before the step (parameters, buffers, inputs,
    existing gradients); their distinct storages on the device form the
    baseline. This function drops its references to them before the step, so
    the step may free them (e.g. ``zero_grad(set_to_none=True)``) and that is
    counted. ``device`` defaults to the first resident tensor's device.
    """
    if torch.autograd.profiler._is_profiler_enabled:
        raise RuntimeError("measure_peak_memory cannot run inside another torch profiler")
    # Collect first, so that garbage from before the step is not freed inside it.
    gc.collect()
    dev, sizes, refs = _resident_storages(resident, device)
    del resident
    # A resident storage whose last reference was the caller's temporary is gone now.
    baseline = sum(n for n, r in zip(sizes, refs) if r is None or r() is not None)
    use_profiler = dev.type == "cpu" or record_timeline

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        start_allocated = torch.cuda.memory_allocated(dev)

    prof = None
    try:
        if use_profiler:
            # CPU activity only: the [memory] events come from the allocators
            # either way, and CUDA kernel tracing would only add overhead.
            with quiet_profiler(), profile(
                activities=[ProfilerActivity.CPU], profile_memory=True
            ) as prof:
                with record_function(_START_MARK):
                    pass
                step()
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        else:
            step()
            torch.cuda.synchronize(dev)
    finally:
        refs.clear()  # no markers after the trace has ended

    timeline = None
    if use_profiler:
        peak, timeline = _replay(prof, dev, sizes, baseline)
    if dev.type == "cpu":
        method = "torch.profiler [memory] events (CPU allocator)"
    else:
        peak = torch.cuda.max_memory_allocated(dev) - start_allocated + baseline
        method = "torch.cuda.max_memory_allocated"
    return MemoryMeasurement(
        peak_bytes=int(peak),
        baseline_bytes=int(baseline),
        method=method,
        device=str(dev),
        timeline=timeline if record_timeline else None,
    )


# --------------------------------------------------------------- step time


def _timer(dev: torch.device) -> tuple[Callable[[Callable[[], object]], float], str]:
    if dev.type == "cuda":

        def run_cuda(step: Callable[[], object]) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(dev)  # earlier work must not land in this step's time
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return run_cuda, "cuda events"

    def run_cpu(step: Callable[[], object]) -> float:
        t = time.perf_counter()
        step()
        return time.perf_counter() - t

    return run_cpu, "time.perf_counter"


def measure_step_time(
    step: Callable[[], object],
    repeats: int = 5,
    warmup: int = 1,
    device: str | torch.device | None = None,
) -> StepTime:
    """Median wall time of ``repeats`` runs of ``step()`` after ``warmup`` untimed runs."""
    return compare_step_times({"step": step}, repeats=repeats, warmup=warmup, device=device)["step"]


def compare_step_times(
    steps: dict[str, Callable[[], object]],
    repeats: int = 5,
    warmup: int = 1,
    *,
    device: str | torch.device | None = None,
) -> dict[str, StepTime]:
    """Time several steps interleaved (a, b, a, b, ...) so that noise hits all alike.

    On this kind of machine a busy neighbour swings step times by up to 10x
    (FACTS.md); only side-by-side medians and their ratios mean anything.
    ``device`` picks the timer; by default CUDA events if CUDA is in use.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    run, method = _timer(_resolve_device(device))
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(run(step))
    return {
        name: StepTime(median_s=statistics.median(ts), times_s=ts, method=method)
        for name, ts in times.items()
    }


def median_interval(values: Sequence[float], confidence: float = 0.9) -> tuple[float, float, float]:
    """The tightest distribution-free interval of order statistics that holds the
    median of the distribution ``values`` were drawn from with at least
    ``confidence`` (the sign test's binomial bound), as (low, high, its coverage).
    Five values give only their range, at 94%; fewer cannot reach 90% at all."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("no values")
    # The interval [x_(k), x_(n-k+1)] misses the median with probability 2·P(B ≤ k-1),
    # B ~ Binomial(n, 1/2).
    def coverage(k: int) -> float:
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= confidence:
        k += 1
    return ordered[k - 1], ordered[n - k], coverage(k)


# ------------------------------------------------------------ RSS cross-check

_RSS_HARNESS = r"""
import gc, json, sys

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field + " not in /proc/self/status")

ns = {"__name__": "__monet_rss__"}
exec(compile(sys.stdin.read(), "<monet rss step>", "exec"), ns)
step = ns["setup"]()
step()  # warm-up: lazy init, thread pools, first-touch of library pages
gc.collect()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM (and ru_maxrss) to the current RSS
baseline = status("VmRSS")
step()
peak = status("VmHWM")
print("MONET_RSS_RESULT " + json.dumps({"baseline_rss": baseline, "peak_rss": peak}))
"""


def rss_peak_subprocess(code: str, mmap_threshold: int = 65536, timeout: float = 300) -> dict:
    """Peak RSS of one step in a fresh process, as a cross-check of the profiler.

    ``code`` is Python source defining ``setup()``, which returns the step
    callable. The harness runs ``setup()`` and one warm-up step, resets the
    kernel's high-water mark, reads VmRSS as the baseline, runs the step and
    reads VmHWM. ``MALLOC_MMAP_THRESHOLD_`` makes glibc return large freed
    blocks to the kernel at once, so RSS follows live memory (at ~3x the step
    time). Linux only. Returns ``baseline_rss``, ``peak_rss`` and ``delta`` in bytes.
    """
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = str(int(mmap_threshold))
    # Let the code import monet even when it is not installed.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_HARNESS],
        input=code,
        check=False,  # the exit status is checked below, with stderr in the message
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("MONET_RSS_RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"RSS subprocess failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}"
        )
    result = json.loads(lines[-1].split(" ", 1)[1])
    result["delta"] = result["peak_rss"] - result["baseline_rss"]
    return result


def quiet_profiler():
    """Kineto prints start/stop lines on the process's stderr; keep them off the user's."""
    return quiet_fd(2)
