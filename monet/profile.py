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
import functools
import hashlib
import inspect
import json
import operator
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
from monet.operators import Rewrite, VariantRefused
from monet.solver.problem import (
    Alternative,
    Choice,
    Override,
    Problem,
    structure_hash,
    write_json_atomic,
)

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
                if not isinstance(workspace, int):
                    raise TypeError(f"bad workspace for {key}")
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


def signature(node: fx.Node, args: Any, kwargs: Any, device: torch.device, target: Any = None) -> str:
    """The cache key: op, argument shapes/strides/dtypes and constants, device, threads."""
    target = node.target if target is None else target
    name = getattr(target, "__module__", "") + "." + getattr(target, "__qualname__", str(target))
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)
    else:
        # A variant's Python code can change under the same name: its module's
        # source is part of the key, so an edited variant is measured again.
        name += "@" + _module_digest(getattr(target, "__module__", None))

    def describe(x: Any) -> str:
        if isinstance(x, torch.Tensor):
            return f"T{tuple(x.shape)}{tuple(x.stride())}{str(x.dtype)[6:]}"
        if isinstance(x, (list, tuple)):
            return "[" + ",".join(describe(v) for v in x) + "]"
        if isinstance(x, dict):
            return "{" + ",".join(f"{k}={describe(v)}" for k, v in sorted(x.items())) + "}"
        return repr(x)

    return f"{device}|t{torch.get_num_threads()}|{name}|{describe(args)}|{describe(kwargs)}"


@functools.cache
def _module_digest(module_name: str | None) -> str:
    module = sys.modules.get(module_name or "")
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()[:12]


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
    return node.target is operator.getitem


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
    runs = _variant_runs(analysed)
    busy = _machine_busy(device)
    with unset_fake_temporarily(), torch.no_grad(), torch.random.fork_rng(
        devices=[device.index or 0] if device.type == "cuda" else []
    ):
        keys, times, refused = _timing_pass(
            analysed, primals, device, cache, repeats, progress, runs
        )
        missing = {i for i, key in keys.items() if cache.get(key) is None}
        workspaces = (
            _workspace_pass(analysed, primals, device, missing, runs, refused) if missing else {}
        )
    busy = busy or _machine_busy(device)
    fresh = {keys[i]: (times[i], workspaces.get(i, 0)) for i in missing}
    if busy and fresh:
        warnings.warn(
            f"monet: the machine was busy while profiling ({busy}): the {len(fresh)} operator "
            "times measured now are inflated; this problem uses them, the profile cache "
            "does not keep them. Profile again with the machine idle."
        )
    else:
        for key, (seconds, workspace) in fresh.items():
            cache.put(key, seconds, workspace)
        cache.save()

    def measured(i: Any) -> tuple[float, int]:
        if i not in keys:
            return 0.0, 0
        return fresh.get(keys[i]) or cache.get(keys[i]) or (0.0, 0)

    nodes = []
    for i, node in enumerate(analysed.problem.nodes):
        seconds, workspace = measured(i)
        nodes.append(dataclasses.replace(node, time=seconds, workspace=workspace))
    choices = []
    for c, site in enumerate(analysed.sites):
        alternatives = [Alternative("default")]
        for k, alternative in enumerate(site.alternatives):
            if (c, k) in refused:
                continue
            overrides = []
            for m, rewrite in enumerate(alternative.rewrites):
                seconds, workspace = measured((c, k, m))
                if rewrite.overwrites is not None:
                    # Its output takes the overwritten value's bytes: none allocated.
                    base = analysed.problem
                    workspace -= sum(base.storage_bytes[s] for s in
                                     base.nodes[analysed.index[rewrite.overwrites]].storages)
                overrides.append(Override(
                    analysed.index[rewrite.node],
                    tuple(analysed.index[n] for n in rewrite.inputs()),
                    seconds, workspace,
                ))
            # The storages the dropped nodes allocate (a view drops nothing of its base's).
            storages = [analysed.problem.nodes[analysed.index[n]].allocates
                        for n in alternative.drops]
            drops = tuple(dict.fromkeys(s for held in storages for s in held))
            if not drops and not any(_worth_offering(nodes[o.node], o) for o in overrides):
                continue
            alternatives.append(
                Alternative(alternative.name, tuple(overrides), alternative.lossy, drops)
            )
        if len(alternatives) > 1:
            choices.append(Choice(site.name, tuple(alternatives)))
    base = analysed.problem
    problem = dataclasses.replace(
        base, nodes=tuple(nodes), choices=tuple(choices),
        graph_hash=structure_hash(tuple(nodes), base.storage_bytes, tuple(choices)),
    )
    stats = ProfileStats(len(order), len(missing), len(keys) - len(missing),
                         time.perf_counter() - started)
    return problem, stats


BUSY_LOAD = 1.5
"""Load (run-queue length) per core above which the CPUs are taken to be shared with other
work: two processes of two threads each on this 2-core machine (load 4) timed a
chunked MLP's weight gradient at 326 ms where it takes 39 idle, and the cache kept
that figure until deleted."""


def _machine_busy(device: torch.device) -> str | None:
    """Why operator times measured now on ``device`` would be inflated, if they would:
    other processes holding the CPUs (the 1-minute load average)."""
    if device.type != "cpu":
        return None
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return None
    cores = os.cpu_count() or 1
    return f"load {load:.1f} on {cores} cores" if load > BUSY_LOAD * cores else None


FASTER = 0.95
"""A variant that only changes speed must be at least 5% faster to be offered."""


def _worth_offering(node, override: Override) -> bool:
    """Whether an override could ever beat the captured node: it reads other values,
    needs less workspace, or is clearly faster (not a timing wobble)."""
    return (
        override.inputs != node.inputs
        or override.workspace < node.workspace
        or override.time < FASTER * node.time
    )


VariantRuns = dict[int, list[tuple[tuple[int, int, int], Rewrite]]]
"""Node index → ((site, alternative, rewrite) key, rewrite) of the variants that replace it."""


def _variant_runs(analysed: AnalysedGraph) -> VariantRuns:
    runs: VariantRuns = {}
    for c, site in enumerate(analysed.sites):
        for k, alternative in enumerate(site.alternatives):
            for m, rewrite in enumerate(alternative.rewrites):
                runs.setdefault(analysed.index[rewrite.node], []).append(((c, k, m), rewrite))
    return runs


def _run_variants(i, runs: VariantRuns, env, refused: set, each) -> None:
    """Call ``each(key, target, args, kwargs, reset)`` for every variant of node ``i`` still
    offered. An in-place variant gets a scratch copy of the value it overwrites, and
    ``reset`` (else None) restores it between runs, outside any timing."""
    for key, rewrite in runs.get(i, ()):
        if key[:2] in refused:
            continue
        values, reset = env, None
        if rewrite.overwrites is not None:
            original = env[rewrite.overwrites]
            scratch = original.clone()
            values = {**env, rewrite.overwrites: scratch}

            def reset(scratch=scratch, original=original) -> None:
                scratch.copy_(original)
        args = fx.node.map_arg(rewrite.args, values.__getitem__)
        kwargs = fx.node.map_arg(rewrite.kwargs, values.__getitem__)
        try:
            each(key, rewrite.target, args, kwargs, reset)
        except VariantRefused:
            refused.add(key[:2])
        except Exception as error:  # noqa: BLE001  (a failing variant is not offered, loudly)
            warnings.warn(f"monet: variant {rewrite.target.__name__} failed on "
                          f"{rewrite.node.name} and is not offered: {error}")
            refused.add(key[:2])


def _execute(
    analysed: AnalysedGraph,
    primals: list[torch.Tensor],
    device: torch.device,
    visit,
    runs: VariantRuns | None = None,
) -> None:
    """Run the joint graph in monet's order, freeing values at their last use.

    ``visit(i, node, args, kwargs, env)`` computes each node; values a variant
    of node ``i`` reads stay alive until ``i`` has run.
    """
    order = analysed.order
    index = analysed.index
    last_use: dict[fx.Node, int] = {}
    for i, node in enumerate(order):
        readers = list(node.all_input_nodes)
        for _, rewrite in (runs or {}).get(i, ()):
            readers += rewrite.inputs()
        for inp in readers:
            last_use[inp] = max(last_use.get(inp, i), i)
    dying: dict[int, list[fx.Node]] = {}
    for value, position in last_use.items():
        dying.setdefault(position, []).append(value)
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
            env[node] = visit(i, node, args, kwargs, env)
        for inp in dying.get(i, ()):
            if analysed.problem.nodes[index[inp]].phase not in ("input",):
                del env[inp]
        if node not in last_use and phase not in ("input",):
            del env[node]


def _time(target, args, kwargs, device, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        target(*args, **kwargs)
        _synchronize(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _timing_pass(analysed, primals, device, cache, repeats, progress, runs):
    keys: dict[Any, str] = {}
    times: dict[Any, float] = {}
    timed: dict[str, float] = {}
    refused: set[tuple[int, int]] = set()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(analysed.order), desc="monet: profiling", unit="op", file=sys.stderr)

    def measure(i: Any, node: fx.Node, target, args: Any, kwargs: Any) -> None:
        key = signature(node, args, kwargs, device, target)
        keys[i] = key
        if key in timed:
            times[i] = timed[key]
        elif cache.get(key) is None:
            times[i] = timed[key] = _time(target, args, kwargs, device, repeats)

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any, env) -> Any:
        if bar is not None:
            bar.update(1)
        value = node.target(*args, **kwargs)
        if _is_free(node):
            return value
        measure(i, node, node.target, args, kwargs)

        def each(key, target, v_args, v_kwargs, reset) -> None:
            target(*v_args, **v_kwargs)  # warm, and refuses inputs it cannot take
            before = reset or (lambda: None)
            variant_key = signature(node, v_args, v_kwargs, device, target)
            keys[key] = variant_key
            if variant_key in timed:
                times[key] = timed[variant_key]
            elif cache.get(variant_key) is None:
                # Against the default, alternately: the ratio survives a busy
                # neighbour that a pair of separate medians would not.
                ratios = [
                    (before(), _time(target, v_args, v_kwargs, device, 1))[1]
                    / max(_time(node.target, args, kwargs, device, 1), 1e-9)
                    for _ in range(max(3, repeats))
                ]
                base = times[i] if i in times else cache.get(keys[i])[0]
                times[key] = timed[variant_key] = base * statistics.median(ratios)

        _run_variants(i, runs, env, refused, each)
        return value

    # Inputs and tangents are not visited; advance the bar for them too.
    if bar is not None:
        bar.update(sum(1 for n in analysed.problem.nodes if n.phase in ("input", "tangent")))
    try:
        _execute(analysed, primals, device, visit, runs)
    finally:
        if bar is not None:
            bar.close()
    return keys, times, refused


def _workspace_pass(analysed, primals, device, wanted: set, runs, refused) -> dict[Any, int]:
    """Bytes each wanted node (or variant) allocates beyond its outputs, from allocator events."""
    if device.type == "cuda":
        return _cuda_workspaces(analysed, primals, device, wanted, runs, refused)
    from torch.profiler import ProfilerActivity, record_function
    from torch.profiler import profile as torch_profile

    labels: list[Any] = []

    def run(key: Any, target, args: Any, kwargs: Any, reset=None) -> Any:
        if reset is not None:
            reset()  # the timing pass left its scratch copy overwritten
        if key not in wanted:
            return target(*args, **kwargs)
        labels.append(key)
        with record_function(f"monet::node{len(labels) - 1}"):
            return target(*args, **kwargs)

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any, env) -> Any:
        # The variants first: the node itself may write over what they read.
        _run_variants(i, runs, env, refused, run)
        return run(i, node.target, args, kwargs)

    with quiet_profiler(), torch_profile(
        activities=[ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        _execute(analysed, primals, device, visit, runs)
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
        key = labels[i]
        result[key] = _workspace(peak, level)
    return result


def _workspace(peak: int, level: int) -> int:
    """Bytes a node needs beyond its outputs, from its allocations' peak and final level
    (relative to its start)."""
    return max(0, peak - max(level, 0))


def _cuda_workspaces(analysed, primals, device, wanted: set, runs, refused) -> dict[Any, int]:
    result: dict[Any, int] = {}

    def run(key: Any, target, args: Any, kwargs: Any, reset=None) -> Any:
        if reset is not None:
            reset()
        if key not in wanted:
            return target(*args, **kwargs)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        value = target(*args, **kwargs)
        torch.cuda.synchronize(device)
        after = torch.cuda.memory_allocated(device)
        result[key] = _workspace(torch.cuda.max_memory_allocated(device) - before,
                                 after - before)
        return value

    def visit(i: int, node: fx.Node, args: Any, kwargs: Any, env) -> Any:
        _run_variants(i, runs, env, refused, run)
        return run(i, node.target, args, kwargs)

    _execute(analysed, primals, device, visit, runs)
    return result


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
