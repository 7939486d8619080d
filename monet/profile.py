"""Profile: per node of the joint graph, its time and workspace, measured on the device.

The joint graph is executed once on real tensors (the model's parameters and
the example inputs; random tangents), freeing each value after its last use.
A node whose (op, shapes, strides, dtypes, device, threads) was measured
before takes its figures from the on-disk cache; any other is timed warm, as
the median of a few repeats, and its workspace (the bytes it allocates beyond
its outputs while it runs) is read from the profiler's allocator events.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import fx

from monet.graph import AnalysedGraph
from monet.measure import quiet_profiler
from monet.solver.problem import Problem, write_json_atomic

CACHE_VERSION = 1


def default_cache_path() -> Path:
    root = os.environ.get("MONET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "monet"
    )
    return Path(root) / f"profile-v{CACHE_VERSION}.json"


class ProfileCache:
    """Measured (time, workspace) per op signature, persisted as JSON."""

    MAX_BYTES = 64 * 1024 * 1024

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else default_cache_path()
        self.entries: dict[str, tuple[float, int]] = {}
        self.dirty = False
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        try:
            if self.path.stat().st_size > self.MAX_BYTES:
                raise ValueError("over the size limit")
            data = json.loads(self.path.read_text())
            if data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
                raise ValueError("unknown format")
            for key, value in data["entries"].items():
                seconds, workspace = value
                if not (isinstance(seconds, (int, float)) and seconds >= 0):
                    raise ValueError(f"bad time for {key}")
                if not (isinstance(workspace, int) and workspace >= 0):
                    raise ValueError(f"bad workspace for {key}")
                self.entries[key] = (float(seconds), workspace)
        except (OSError, ValueError, TypeError, json.JSONDecodeError) as error:
            warnings.warn(f"monet: ignoring the profile cache {self.path} ({error}); rebuilding it")
            self.entries = {}
            self.dirty = True

    def get(self, key: str) -> tuple[float, int] | None:
        return self.entries.get(key)

    def put(self, key: str, seconds: float, workspace: int) -> None:
        self.entries[key] = (seconds, workspace)
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        data = {"version": CACHE_VERSION, "entries": self.entries}
        try:
            write_json_atomic(self.path, data)
            self.dirty = False
        except OSError as error:
            warnings.warn(f"monet: could not write the profile cache {self.path}: {error}")


@dataclasses.dataclass
class ProfileStats:
    nodes: int
    measured: int
    cached: int
    seconds: float


def signature(node: fx.Node, args: Any, kwargs: Any, device: torch.device) -> str:
    """The cache key: op, argument shapes/strides/dtypes and constants, device, threads."""

    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{tuple(x.stride())}{str(x.dtype)[6:]}"
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(describe(v) for v in x) + "]"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}={describe(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)

    return (
        f"{device}|t{torch.get_num_threads()}|{node.target}|{describe(args)}|{describe(kwargs)}"
    )


def _tangent_value(node: fx.Node, device: torch.device) -> torch.Tensor:
    val = node.meta["val"]
    out = torch.empty_strided(val.shape, val.stride(), dtype=val.dtype, device=device)
    if out.is_floating_point():
        out.normal_()
    else:
        out.zero_()
    return out


def _is_free(node: fx.Node) -> bool:
    # getitem only unpacks a tuple: nothing to time.
    return not isinstance(node.target, torch._ops.OpOverload)


def profile(
    analysed: AnalysedGraph,
    primals: list[torch.Tensor],
    cache: ProfileCache | None = None,
    repeats: int = 3,
    progress: bool = False,
) -> tuple[Problem, ProfileStats]:
    """The analysed problem with every node's time and workspace filled in."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    started = time.perf_counter()
    cache = cache if cache is not None else ProfileCache()
    order = analysed.order
    device = primals[0].device if primals else torch.device("cpu")
    with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(
        devices=[device.index or 0] if device.type == "cuda" else []
    ):
        keys, times = _timing_pass(analysed, primals, device, cache, repeats, progress)
        missing = {i for i, key in keys.items() if cache.get(key) is None}
        workspaces = _workspace_pass(analysed, primals, device, missing) if missing else {}
    for i, key in keys.items():
        if i in missing:
            cache.put(key, times[i], workspaces.get(i, 0))
    cache.save()
    nodes = []
    for i, node in enumerate(analysed.problem.nodes):
        if i in keys:
            seconds, workspace = cache.get(keys[i]) or (0.0, 0)
        else:
            seconds, workspace = 0.0, 0
        nodes.append(dataclasses.replace(node, time=seconds, workspace=workspace))
    problem = dataclasses.replace(analysed.problem, nodes=tuple(nodes))
    stats = ProfileStats(len(order), len(missing), len(keys) - len(missing),
                         time.perf_counter() - started)
    return problem, stats


def _execute(
    analysed: AnalysedGraph, primals: list[torch.Tensor], device: torch.device, visit
) -> None:
    """Run the joint graph in monet's order, freeing values at their last use."""
    order = analysed.order
    index = analysed.index
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(order):
        for inp in node.all_input_nodes:
            last_use[inp] = i
    env: dict[fx.Node, Any] = {}
    primal_iter = iter(primals)
    for i, node in enumerate(order):
        phase = analysed.problem.nodes[i].phase
        if phase == "input":
            env[node] = next(primal_iter)
        elif phase == "tangent":
            env[node] = _tangent_value(node, device)
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
            env[node] = visit(i, node, args, kwargs)
        for inp in node.all_input_nodes:
            if last_use[inp] == i and analysed.problem.nodes[index[inp]].phase not in ("input",):
                del env[inp]
        if node not in last_use and phase not in ("input",):
            del env[node]


def _timing_pass(analysed, primals, device, cache, repeats, progress):
    keys: dict[int, str] = {}
    times: dict[int, float] = {}
    timed: dict[str, float] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(analysed.order), desc="monet: profiling", unit="op", file=sys.stderr)

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if bar is not None:
            bar.update(1)
        value = node.target(*args, **kwargs)
        if _is_free(node):
            return value
        key = signature(node, args, kwargs, device)
        keys[i] = key
        if key in timed:
            times[i] = timed[key]
        elif cache.get(key) is None:
            samples = []
            for _ in range(repeats):
                _synchronize(device)
                start = time.perf_counter()
                node.target(*args, **kwargs)
                _synchronize(device)
                samples.append(time.perf_counter() - start)
            times[i] = timed[key] = statistics.median(samples)
        return value

    # Inputs and tangents are not visited; advance the bar for them too.
    if bar is not None:
        bar.update(sum(1 for n in analysed.problem.nodes if n.phase in ("input", "tangent")))
    try:
        _execute(analysed, primals, device, visit)
    finally:
        if bar is not None:
            bar.close()
    return keys, times


def _workspace_pass(analysed, primals, device, wanted: set[int]) -> dict[int, int]:
    """Bytes each wanted node allocates beyond its outputs, from allocator events."""
    if device.type == "cuda":
        return _cuda_workspaces(analysed, primals, device, wanted)
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if i not in wanted:
            return node.target(*args, **kwargs)
        with record_function(f"monet::node{i}"):
            return node.target(*args, **kwargs)

    with quiet_profiler(), torch_profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        _execute(analysed, primals, device, visit)
    ranges: list[tuple[int, int, int]] = []
    allocations: list[tuple[int, int]] = []
    for event in prof.profiler.kineto_results.events():
        name = event.name()
        if name == "[memory]":
            allocations.append((event.start_ns(), event.nbytes()))
        elif name.startswith("monet::node"):
            start = event.start_ns()
            ranges.append((start, start + event.duration_ns(), int(name[len("monet::node"):])))
    allocations.sort()
    result: dict[int, int] = {}
    position = 0
    for start, end, i in sorted(ranges):
        while position < len(allocations) and allocations[position][0] < start:
            position += 1
        level = peak = 0
        k = position
        while k < len(allocations) and allocations[k][0] <= end:
            level += allocations[k][1]
            peak = max(peak, level)
            k += 1
        result[i] = max(0, peak - max(level, 0))
    return result


def _cuda_workspaces(analysed, primals, device, wanted: set[int]) -> dict[int, int]:
    result: dict[int, int] = {}

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any) -> Any:
        if i not in wanted:
            return node.target(*args, **kwargs)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        value = node.target(*args, **kwargs)
        torch.cuda.synchronize(device)
        after = torch.cuda.memory_allocated(device)
        result[i] = max(0, torch.cuda.max_memory_allocated(device) - after)
        return value

    _execute(analysed, primals, device, visit)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
