"""Tests for monet.measure: exact peaks of hand-built steps, and the RSS cross-check."""

from __future__ import annotations

import sys

import pytest
import torch

from monet.measure import (
    MemoryMeasurement,
    compare_step_times,
    measure_peak_memory,
    measure_step_time,
    resident_tensors,
    rss_peak_subprocess,
    storage_bytes,
)

MiB = 1 << 20
FLOATS_PER_MIB = MiB // 4


def test_storage_bytes_counts_views_once():
    a = torch.empty(FLOATS_PER_MIB)
    views = [a, a[10:], a.view(2, -1), a.view(2, -1).t(), a.as_strided((4,), (2,))]
    assert storage_bytes(views) == MiB
    b = torch.empty(3, dtype=torch.float64)
    assert storage_bytes([a, None, 3, "x", b, a[1:]]) == MiB + 24
    # Nested containers and generators are walked.
    assert storage_bytes(x for x in [(a, [b]), {"k": a[5:]}]) == MiB + 24
    assert storage_bytes([]) == 0


def test_storage_bytes_counts_the_whole_storage_of_a_slice():
    a = torch.empty(1000)
    assert storage_bytes([a[:10]]) == 4000  # the storage stays alive whole


def test_storage_bytes_with_grads_and_sparse():
    lin = torch.nn.Linear(8, 4)  # 32 + 4 floats
    assert storage_bytes(lin.parameters()) == 36 * 4
    lin(torch.randn(2, 8)).sum().backward()
    res = resident_tensors(lin, torch.empty(5))
    assert storage_bytes(res) == 2 * 36 * 4 + 20
    s = torch.sparse_coo_tensor(
        torch.tensor([[0, 2]]), torch.tensor([1.0, 2.0]), (4,), check_invariants=True
    )
    assert storage_bytes([s]) == 2 * 8 + 2 * 4  # int64 indices + float values


def test_peak_of_known_allocations_is_exact():
    def step():
        a = torch.empty(4 * FLOATS_PER_MIB)
        b = torch.empty(8 * FLOATS_PER_MIB)  # while a is alive
        del a, b
        c = torch.empty(2 * FLOATS_PER_MIB)  # lower than the peak: no effect
        del c

    m = measure_peak_memory(step, device="cpu", record_timeline=True)
    assert isinstance(m, MemoryMeasurement)
    assert m.device == "cpu" and "profiler" in m.method
    assert m.baseline_bytes == 0
    assert m.peak_bytes == 12 * MiB
    assert [b for _, b in m.timeline] == [0, 4 * MiB, 12 * MiB, 8 * MiB, 0, 2 * MiB, 0]
    times = [t for t, _ in m.timeline]
    assert times == sorted(times)


def test_baseline_counts_each_resident_storage_once():
    w = torch.empty(3 * FLOATS_PER_MIB)
    x = torch.empty(FLOATS_PER_MIB)

    def step():
        y = torch.empty(5 * FLOATS_PER_MIB)
        del y

    m = measure_peak_memory(step, resident=[w, w[1:], w.view(3, -1), x, None])
    assert m.baseline_bytes == 4 * MiB
    assert m.peak_bytes == 9 * MiB
    assert m.delta_bytes == 5 * MiB


def test_resident_tensors_on_another_device_are_not_counted():
    w = torch.empty(FLOATS_PER_MIB)
    meta = torch.empty(10 * FLOATS_PER_MIB, device="meta")
    m = measure_peak_memory(lambda: None, resident=[meta, w], device="cpu")
    assert m.baseline_bytes == MiB and m.peak_bytes == MiB


def test_step_freeing_a_resident_storage_lowers_the_running_sum():
    p = torch.nn.Parameter(torch.zeros(FLOATS_PER_MIB))
    p.grad = torch.zeros(4 * FLOATS_PER_MIB)[:FLOATS_PER_MIB]  # a view: its storage is 4 MiB

    def step():
        p.grad = None  # frees the 4 MiB grad storage, allocated before the profile
        g = torch.empty(6 * FLOATS_PER_MIB)
        del g

    m = measure_peak_memory(step, resident=resident_tensors(torch.nn.ParameterList([p])))
    assert m.baseline_bytes == 5 * MiB
    assert m.peak_bytes == 7 * MiB  # 1 MiB param + 6 MiB; the grad was gone


def test_resident_allocated_under_an_earlier_profile_is_freed_once():
    # The CPU allocator reports the free of a block it saw allocated under an
    # earlier profiler session; it must not count twice with the marker.
    holder: dict[str, torch.Tensor] = {}

    def make():
        holder["a"] = torch.empty(4 * FLOATS_PER_MIB)
        holder["b"] = torch.empty(FLOATS_PER_MIB)

    assert measure_peak_memory(make).peak_bytes == 5 * MiB
    resident = (holder[k] for k in ["a"])  # no strong reference left; b stays outside

    def step():
        del holder["a"], holder["b"]
        c = torch.empty(8 * FLOATS_PER_MIB)
        del c

    m = measure_peak_memory(step, resident=resident, device="cpu")
    assert m.baseline_bytes == 4 * MiB
    assert m.peak_bytes == 8 * MiB


def test_exception_propagates_and_stops_the_profiler():
    def step():
        x = torch.empty(FLOATS_PER_MIB)  # noqa: F841
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        measure_peak_memory(step, device="cpu")
    assert not torch.autograd.profiler._is_profiler_enabled
    m = measure_peak_memory(lambda: torch.empty(FLOATS_PER_MIB), device="cpu")
    assert m.peak_bytes == MiB


def test_refuses_to_nest_inside_a_profiler():
    cpu = [torch.profiler.ProfilerActivity.CPU]
    with (
        torch.profiler.profile(activities=cpu),
        pytest.raises(RuntimeError, match="another torch profiler"),
    ):
        measure_peak_memory(lambda: None, device="cpu")


def test_measure_step_time():
    calls = []
    st = measure_step_time(lambda: calls.append(1), repeats=3, warmup=2, device="cpu")
    assert len(calls) == 5
    assert len(st.times_s) == 3 and all(t >= 0 for t in st.times_s)
    assert st.median_s == sorted(st.times_s)[1]
    assert st.method == "time.perf_counter"


def test_compare_step_times_interleaves():
    log: list[str] = []
    steps = {name: (lambda n=name: log.append(n)) for name in ("a", "b", "c")}
    res = compare_step_times(steps, repeats=3, warmup=1)
    assert log == ["a", "b", "c"] * 4
    assert set(res) == {"a", "b", "c"}
    assert all(len(r.times_s) == 3 for r in res.values())


def test_rss_subprocess_reports_failures():
    with pytest.raises(RuntimeError, match="ZeroDivisionError"):
        rss_peak_subprocess("def setup():\n    return lambda: 1 / 0\n", timeout=60)


# A training step whose activations are a few hundred MiB, so that RSS noise
# (interpreter, libraries, glibc's small-block heap) is small beside them.
MLP_STEP = """
import torch

def setup():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    layers = [m for _ in range(4) for m in (torch.nn.Linear(64, 64), torch.nn.GELU())]
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(1 << 17, 64)

    def step():
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        opt.step()

    step.model, step.x = model, x
    return step
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")
def test_profiler_peak_agrees_with_rss_cross_check():
    rss = rss_peak_subprocess(MLP_STEP, timeout=120)
    ns: dict = {}
    exec(MLP_STEP, ns)  # noqa: S102 - our own source, the same the subprocess runs
    step = ns["setup"]()
    step()  # the same warm-up as the subprocess: gradients exist at the start
    m = measure_peak_memory(step, resident=resident_tensors(step.model, step.x))
    assert m.delta_bytes > 200 * MiB
    assert abs(m.delta_bytes - rss["delta"]) <= 0.10 * rss["delta"], (m, rss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peak_of_known_allocations():
    dev = torch.device("cuda")
    w = torch.empty(FLOATS_PER_MIB, device=dev)

    def step():
        a = torch.empty(4 * FLOATS_PER_MIB, device=dev)
        b = torch.empty(8 * FLOATS_PER_MIB, device=dev)
        del a, b

    m = measure_peak_memory(step, resident=[w], record_timeline=True)
    assert m.method == "torch.cuda.max_memory_allocated"
    assert m.device.startswith("cuda")
    assert m.baseline_bytes == MiB
    assert m.peak_bytes == 13 * MiB
    assert max(b for _, b in m.timeline) == 13 * MiB
    st = measure_step_time(step, repeats=2, device=dev)
    assert st.method == "cuda events" and len(st.times_s) == 2


def test_median_interval_is_the_sign_test_interval():
    """Order statistics around the median: five values give their range at 30/32, eleven
    the 3rd and 9th at 1 - 2·67/2048; fewer than five cannot reach 90%."""
    from monet.measure import median_interval

    assert median_interval([5, 1, 4, 2, 3]) == (1, 5, 30 / 32)
    assert median_interval(list(range(11, 0, -1))) == (3, 9, 1 - 2 * 67 / 2048)
    low, high, coverage = median_interval([2.0, 1.0, 3.0])
    assert (low, high) == (1.0, 3.0) and coverage == 0.75
    for n in range(5, 40):
        assert median_interval(range(n))[2] >= 0.9
    with pytest.raises(ValueError):
        median_interval([])
