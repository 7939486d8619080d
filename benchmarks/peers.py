"""Peers: monet beside what a user would pick instead, on one memory/time frontier per model.

    python benchmarks/peers.py [MODEL ...] [--models MODEL ...]
        [--methods eager checkpoint compile rockmate revvit monet monet-checkpoint
                   monet-reversible monet-no-attention]
        [--budgets 1.0,0.7,0.5,0.35] [--compile-budgets 1.0,0.5,0.2]
        [--compile-models MODEL ...] [--time-limit 10] [--repeats 5] [--threads 1]
        [--output-dir benchmarks/results/peers]
    monet report                  # this script with its defaults: the committed report
    monet bench MODEL ... [same options]   # the same, written to ./monet-bench

Models are positional or after ``--models`` (both add up); without either, the
report's models (``DEFAULT_MODELS``).

For each model, in one process and on the same inputs:

- eager PyTorch (the 1.0 point);
- ``torch.utils.checkpoint.checkpoint(block, ..., use_reentrant=False)`` around every
  block and around every 2nd block, on a copy of the model (the blocks: the children of
  the longest ``nn.Sequential``/``nn.ModuleList`` of one type, and of every other
  container of children of that type);
- ``torch.compile`` with ``torch._functorch.config.activation_memory_budget`` patched;
- Rockmate: a row that says why it did not run;
- RevViT's reversible backward (RevViT models; eager and the other methods then run
  the same weights under plain autograd, ``model.twin(reversible=False)``);
- monet at budgets that are fractions of eager's peak as measured here: joint (keep,
  recompute and operator variants) and checkpoint-only (``variants=False``); on a
  RevViT also joint on the reversible model itself (``monet reversible``: its rebuild of
  the block inputs is one more choice, against reading the forward's values).

Every method's peak is measured the same way (``monet.measure.measure_peak_memory``:
on CPU the torch profiler's ``[memory]`` allocator events), on one step after a
warm-up; step times are medians of the steps of all methods interleaved
(``monet.measure.compare_step_times``), and a method's overhead is its median over
eager's. Each row also checks one step's parameter gradients against eager's.

Writes frontier.csv, summary.md, report.md, frontier_<model>.png and
timeline_<model>.png to benchmarks/results/peers/.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.util
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib
import pandas as pd
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from checkpoint_frontier import MIB, RTOL, Case, machine, one_step

import monet  # imported after the path fix, so that a plain checkout runs
import monet.models
from monet.capture import flat_tensors
from monet.cli import markdown_table, shapes
from monet.measure import compare_step_times, measure_peak_memory, median_interval
from monet.models.revvit import RevViT
from monet.runtime import backward_step

matplotlib.use("Agg")  # files only: no display on a benchmark machine
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results" / "peers"
# The zoo at training sizes whose eager step takes a few seconds on 1 thread, batches
# large enough that activations outweigh parameters and gradients, and the demo ViT;
# MViTv2 (the largest graph, the longest compiles) last.
DEFAULT_MODELS = [
    "vit_small_demo", "convnext_t:6:224", "revvit_s:8:224", "sam2_hiera_t:1:512",
    "mvitv2_t:6:224",
]
DEFAULT_BUDGETS = "1.0,0.7,0.5,0.35"
DEFAULT_COMPILE_BUDGETS = "1.0,0.5,0.2"
FRACTIONS = (0.7, 0.5, 0.35)
ATOL = 1e-6
COMPILE_ATOL = 1e-5  # inductor fuses and reorders float arithmetic
VARIANT_ATOL = 1e-5  # monet's operator variants: other kernels, norms rebuilt from outputs
TIMELINE_BUDGET = 0.5

EAGER, CHECKPOINT, COMPILE, ROCKMATE, REVVIT, MONET, MONET_CHECKPOINT, MONET_REVERSIBLE = (
    "eager", "checkpoint", "torch.compile", "rockmate", "revvit reversible", "monet",
    "monet checkpoint-only", "monet reversible",
)
MONET_NO_ATTENTION = "monet without attention variants"
METHOD_ARGS = {
    "eager": EAGER, "checkpoint": CHECKPOINT, "compile": COMPILE,
    "rockmate": ROCKMATE, "revvit": REVVIT, "monet": MONET,
    "monet-checkpoint": MONET_CHECKPOINT, "monet-reversible": MONET_REVERSIBLE,
    "monet-no-attention": MONET_NO_ATTENTION,
}
MONETS = (MONET, MONET_CHECKPOINT, MONET_REVERSIBLE, MONET_NO_ATTENTION)
"""monet joint (keep/recompute and operator variants), monet without variants, monet
joint on a RevViT's reversible capture (its rebuild a choice: ``reversible.keep``), and
monet joint without the chunked written-out attention (``attention_variants=False``, as
monet was before it was offered by default)."""
STYLES = {  # colour and marker per method, the same in every figure
    EAGER: ("black", "*"), CHECKPOINT: ("tab:orange", "s"), COMPILE: ("tab:green", "^"),
    REVVIT: ("tab:purple", "D"), MONET: ("tab:blue", "o"), MONET_CHECKPOINT: ("tab:cyan", "v"),
    MONET_REVERSIBLE: ("tab:red", "P"), MONET_NO_ATTENTION: ("tab:brown", "X"),
}

# Models that are not zoo names: a zoo builder with overrides, its batch and image size.
PRESETS: dict[str, tuple[str, dict[str, Any], int, int]] = {
    # A 4-block RevViT shaped like vit_small_demo (64² images, 8² patches, width 192).
    "revvit_small_demo": (
        "revvit_s",
        {"depth": 4, "embed_dim": 192, "num_heads": 3, "patch_size": 8, "num_classes": 100},
        16,
        64,
    ),
}

MEMORY_METHOD = "torch.profiler [memory] events (CPU allocator)"


# ------------------------------------------------------------------- models


@dataclass
class Subject:
    """One model of the report, built: eager's module, its inputs, and its reversible twin."""

    label: str
    model: nn.Module
    inputs: tuple
    batch: int
    reversible: nn.Module | None = None

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def model_arg(text: str) -> Case:
    """``NAME[:BATCH[:IMAGE]]``: a zoo name or a preset of this benchmark."""
    return Case.parse(text)


def case_label(case: Case) -> str:
    """The model's name in the report: ``NAME[:BATCH[:IMAGE]]`` as given."""
    return ":".join(str(part) for part in (case.name, case.batch, case.image) if part is not None)


def build(case: Case) -> Subject:
    """The model (seed 0) and inputs (seed 0); a RevViT runs under plain autograd as eager."""
    if case.name in PRESETS:
        base, overrides, default_batch, default_image = PRESETS[case.name]
        batch = case.batch or default_batch
        image = case.image or default_image
        torch.manual_seed(0)
        model = monet.models.create(base, image_size=image, **overrides).train()
        torch.manual_seed(0)
        inputs: tuple = (torch.randn(batch, 3, image, image),)
    else:
        model, inputs, batch = case.build()
    label = case_label(case)
    if isinstance(model, RevViT) and model.reversible:
        # Eager, checkpoint, compile and monet get the same weights without the rewrite.
        return Subject(label, model.twin(reversible=False), inputs, batch, reversible=model)
    return Subject(label, model, inputs, batch)


def block_containers(model: nn.Module) -> list[nn.Module]:
    """The containers of the model's repeated blocks.

    The longest ``nn.Sequential``/``nn.ModuleList`` whose children all have one
    type names the block type; every container of children of that type is
    taken (a model in stages, such as ConvNeXt, has one per stage), except one
    inside another that is taken.
    """
    found: list[tuple[str, nn.Module, type]] = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Sequential, nn.ModuleList)) and len(module) >= 2:
            kinds = {type(child) for child in module}
            if len(kinds) == 1:
                found.append((name, module, kinds.pop()))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no nn.Sequential/nn.ModuleList of same-type blocks"
        )
    block_type = max(found, key=lambda item: len(item[1]))[2]  # max keeps the first of ties
    taken: list[tuple[str, nn.Module]] = []
    for name, module, kind in found:
        inside = any(name.startswith(f"{outer}.") for outer, _ in taken)
        if kind is block_type and not inside:
            taken.append((name, module))
    return [module for _, module in taken]


class Checkpointed(nn.Module):
    """Runs its block under non-reentrant ``torch.utils.checkpoint``: the backward recomputes it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return checkpoint(self.block, *args, use_reentrant=False, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Models that read attributes of their blocks (widths, strides) still find them.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)


def checkpointed(model: nn.Module, every: int) -> tuple[nn.Module, int, int]:
    """A copy of ``model`` with every ``every``-th block checkpointed; (copy, wrapped, blocks)."""
    model = copy.deepcopy(model)
    index = wrapped = 0
    for container in block_containers(model):
        for position in range(len(container)):
            if index % every == 0:
                container[position] = Checkpointed(container[position])
                wrapped += 1
            index += 1
    return model, wrapped, index


def has_random_ops(model: nn.Module, inputs: tuple) -> bool:
    """Whether the training forward draws random numbers (dropout, stochastic depth)."""
    outputs = []
    with torch.no_grad():
        for seed in (1, 2):
            torch.manual_seed(seed)
            outputs.append(
                [t for t in torch.utils._pytree.tree_leaves(model(*inputs))
                 if isinstance(t, torch.Tensor)]
            )
    return not all(torch.equal(a, b) for a, b in zip(*outputs))


# ------------------------------------------------------------------ methods


@dataclass
class Entry:
    """One method at one setting: what a training step calls, and its row."""

    method: str
    setting: str
    params_of: nn.Module  # receives the gradients (and holds the parameters counted)
    forward: Callable[..., Any]  # what a step calls with the inputs
    row: dict[str, Any] = field(default_factory=dict)
    atol: float = ATOL
    timeline: list[tuple[float, int]] | None = None
    grads: list[torch.Tensor | None] | None = None


def error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def compile_backend(budget: float) -> Callable[..., Any]:
    """Inductor with the activation budget patched in while it partitions.

    A new backend per budget is what keeps the compiles apart: with one backend,
    dynamo reuses the first copy's compiled code for every later copy of the
    same model class (their guards match), so later budgets would never apply.
    """
    from torch._inductor.compile_fx import compile_fx

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        with torch._functorch.config.patch(activation_memory_budget=budget):
            return compile_fx(graph, example_inputs)

    return backend


def compiled_entry(subject: Subject, budget: float) -> Entry:
    """A torch.compile'd copy, compiled (forward and backward) by one step under the budget."""
    model = copy.deepcopy(subject.model)
    compiled = torch.compile(model, backend=compile_backend(budget))
    entry = Entry(COMPILE, f"budget {budget:g}", model, compiled, atol=COMPILE_ATOL)
    started = time.perf_counter()
    with torch._functorch.config.patch(activation_memory_budget=budget):
        backward_step(model, lambda: compiled(*subject.inputs), subject.inputs)()
    entry.row["prepare_s"] = time.perf_counter() - started
    return entry


def variants_chosen(optimized: Any) -> str:
    """The operator variants a plan runs, counted by kind: ``layer_norm.backward_from_output×9``."""
    counts = Counter(optimized.report().variants.values())
    return ", ".join(f"{name}×{count}" for name, count in sorted(counts.items())) or "none"


def _monet_source(subject: Subject, method: str) -> nn.Module:
    """The module monet optimises: the reversible RevViT for ``monet reversible``, else
    the plain one every other method runs."""
    if method == MONET_REVERSIBLE:
        assert subject.reversible is not None
        return subject.reversible
    return subject.model


def monet_entry(
    subject: Subject, fraction: float, eager_peak: int, time_limit: float, method: str = MONET
) -> Entry:
    """monet planned for ``fraction`` of eager's measured peak, in bytes."""
    model = copy.deepcopy(_monet_source(subject, method))
    budget = int(fraction * eager_peak)
    # Bytes from eager's peak measured here, so that 0.5 means half of the eager row;
    # timing_repeats=0: this benchmark times every method itself, side by side.
    optimized = monet.optimize(
        model, budget, subject.inputs, time_limit=time_limit, timing_repeats=0,
        variants=method != MONET_CHECKPOINT, attention_variants=method != MONET_NO_ATTENTION,
    )
    plan = optimized.last_plan
    assert plan is not None  # example inputs in training mode plan at once
    entry = Entry(method, f"budget {fraction:g}", model, optimized)
    entry.row.update(
        budget_bytes=budget,
        predicted_peak_bytes=plan.schedule.predicted_peak,
        predicted_added_s=plan.schedule.predicted_overhead,
        prepare_s=sum(plan.seconds.values()),
        solve_s=plan.schedule.solve_seconds,
        status=f"{plan.schedule.status} ({plan.schedule.backend})",
        variants=variants_chosen(optimized),
    )
    if optimized.report().variants:
        entry.atol = VARIANT_ATOL
    return entry


def monet_least_entry(subject: Subject, time_limit: float, method: str = MONET) -> Entry:
    """monet at the least peak its solver finds, run from the saved schedule."""
    import tempfile

    from monet.solver import minimum_budget

    source = _monet_source(subject, method)
    model = copy.deepcopy(source)
    started = time.perf_counter()
    joint = method != MONET_CHECKPOINT
    attention = method != MONET_NO_ATTENTION
    problem = monet.optimize(
        copy.deepcopy(source), 1.0, subject.inputs, measure=False, variants=joint,
        attention_variants=attention,
    ).last_plan.problem
    schedule, _ = minimum_budget(problem, time_limit)
    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/least.json"
        schedule.save(path)
        optimized = monet.optimize(
            model, schedule.predicted_peak, subject.inputs, schedule=path, timing_repeats=0,
            variants=joint, attention_variants=attention,
        )
    plan = optimized.last_plan
    entry = Entry(method, "least peak", model, optimized)
    entry.row.update(variants=variants_chosen(optimized))
    if optimized.report().variants:
        entry.atol = VARIANT_ATOL
    entry.row.update(
        budget_bytes=schedule.predicted_peak,
        predicted_peak_bytes=plan.schedule.predicted_peak,
        predicted_added_s=plan.schedule.predicted_overhead,
        prepare_s=time.perf_counter() - started,
        solve_s=schedule.solve_seconds,
        status=f"{schedule.status} ({schedule.backend})",
    )
    return entry


def rockmate_reason() -> tuple[str, str]:
    """Why Rockmate has no measurement here: (short, detailed)."""
    # What FACTS.md records of rockmate 2.0.0 from PyPI on this kind of machine.
    detail = (
        "as published it has hard-coded CUDA streams/events and pin_memory=True, and it "
        "measures activations by RSS, which without a fixed mmap threshold reads 0 bytes "
        "each, so it plans nothing (FACTS.md)"
    )
    if importlib.util.find_spec("rockmate") is None:
        return "not installed; does not run on CPU without patches", (
            f"importlib.util.find_spec('rockmate') is None; {detail}"
        )
    return "installed, not run: does not run on CPU without patches", detail


# ------------------------------------------------------------------ measure


def measure(entry: Entry, inputs: tuple) -> None:
    """Peak (with its timeline) of one step after a warm-up, the way monet measures eager's."""
    step = backward_step(entry.params_of, lambda: entry.forward(*inputs), inputs)
    step()  # warm-up: lazy state, AOTAutograd's lazily compiled backward
    result = measure_peak_memory(
        step, flat_tensors(entry.params_of, inputs, {})[0], record_timeline=True
    )
    entry.row["peak_bytes"] = result.peak_bytes
    entry.row["memory_method"] = result.method
    entry.timeline = result.timeline


def gradients(entry: Entry, inputs: tuple) -> list[torch.Tensor | None]:
    """Parameter gradients of one training step (fixed seed, cross-entropy), then cleared."""
    parameters = list(entry.params_of.parameters())
    one_step(entry.forward, parameters, inputs)  # type: ignore[arg-type]
    grads = [None if p.grad is None else p.grad.detach().clone() for p in parameters]
    for p in parameters:
        p.grad = None
    return grads


def same(
    a: list[torch.Tensor | None], b: list[torch.Tensor | None], atol: float
) -> tuple[bool, float]:
    """(every gradient allclose, largest absolute difference)."""
    equal, largest = len(a) == len(b), 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            equal &= x is None and y is None
            continue
        largest = max(largest, (x - y).abs().max().item())
        equal &= torch.allclose(y, x, rtol=RTOL, atol=atol)
    return bool(equal), largest


# ------------------------------------------------------------------ one model


def run_model(
    subject: Subject, methods: Sequence[str], arguments: argparse.Namespace, bar: tqdm
) -> tuple[list[dict[str, Any]], dict[str, list[tuple[float, int]]]]:
    """Every method's rows for one model, and the timelines the figure shows."""
    inputs = subject.inputs
    base = {"model": subject.label, "batch": subject.batch, "inputs": shapes(inputs)}
    entries: list[Entry] = []
    rows: list[dict[str, Any]] = []
    random_ops = has_random_ops(subject.model, inputs)
    eager_model = copy.deepcopy(subject.model)
    eager = Entry(EAGER, "-", eager_model, eager_model)
    reference = gradients(eager, inputs)
    compile_grads: list[torch.Tensor | None] | None = None
    clock = [time.perf_counter()]  # when the last row ended: a row's wall time includes its setup

    def finish(entry: Entry | None, method: str, setting: str, **extra: Any) -> None:
        """Measure and check an entry (or record a failure), then print its progress line."""
        nonlocal compile_grads
        row = {**base, "method": method, "setting": setting}
        if entry is not None:
            try:
                measure(entry, inputs)
                grads = gradients(entry, inputs)
                equal, largest = same(reference, grads, entry.atol)
                entry.row.update(grads_equal=equal, max_grad_diff=largest)
                if method == COMPILE and random_ops:
                    # Inductor draws dropout masks from its own generator: not eager's numbers.
                    first = compile_grads is None
                    compile_grads = grads if first else compile_grads
                    agree = "" if first else (
                        "; equal to the first compile budget's: "
                        + ("yes" if same(compile_grads, grads, ATOL)[0] else "NO")
                    )
                    entry.row.update(
                        grads_equal=None,
                        grads_note="not comparable: inductor draws its own dropout masks" + agree,
                    )
                entries.append(entry)
                row.update(entry.row)
            except Exception as error:  # noqa: BLE001  (one failing method must not lose the others' rows)
                row["error"] = error_text(error)
        row.update(extra)
        row["wall_s"] = time.perf_counter() - clock[0]
        clock[0] = time.perf_counter()
        rows.append(row)
        bar.update(1)
        bar.write(progress_line(row, rows[0].get("peak_bytes")), file=sys.stderr)

    finish(eager, EAGER, "-")
    eager_peak = rows[0].get("peak_bytes")
    if eager_peak is None:
        raise RuntimeError(f"{subject.label}: eager's step failed: {rows[0].get('error')}")

    if CHECKPOINT in methods:
        for every, setting in ((1, "every block"), (2, "every 2nd block")):
            try:
                model, wrapped, blocks = checkpointed(subject.model, every)
            except Exception as error:  # noqa: BLE001  (recorded in the row)
                finish(None, CHECKPOINT, setting, error=error_text(error))
                continue
            finish(Entry(CHECKPOINT, setting, model, model), CHECKPOINT, setting,
                   note=f"{wrapped} of {blocks} blocks ({type(model).__name__})")
    if COMPILE in methods:
        for budget in arguments.compile_budgets:
            setting = f"budget {budget:g}"
            bar.set_description(f"{subject.label}: compiling at {setting}")
            try:
                entry = compiled_entry(subject, budget)
            except Exception as error:  # noqa: BLE001  (recorded in the row)
                finish(None, COMPILE, setting, error=error_text(error))
                continue
            finish(entry, COMPILE, setting)
    if subject.label in getattr(arguments, "compile_skipped", ()):
        finish(None, COMPILE, "-", error="not run on this model: --compile-models "
               + " ".join(arguments.compile_models))
    if ROCKMATE in methods:
        short, detail = rockmate_reason()
        finish(None, ROCKMATE, "-", error=short, note=detail)
    if REVVIT in methods and subject.reversible is not None:
        reversible = copy.deepcopy(subject.reversible)
        finish(Entry(REVVIT, "reversible backward", reversible, reversible), REVVIT,
               "reversible backward")
    for method in (m for m in MONETS if m in methods):
        for fraction in arguments.budgets:
            setting = f"budget {fraction:g}"
            bar.set_description(f"{subject.label}: {method} at {setting}")
            started = time.perf_counter()
            try:
                entry = monet_entry(subject, fraction, eager_peak, arguments.time_limit, method)
            except monet.InfeasibleBudgetError as error:
                least = "?" if error.minimum is None else f"{mib(error.minimum)} MiB"
                finish(None, method, setting, budget_bytes=error.budget, status="infeasible",
                       error=f"infeasible (min {least})", minimum_bytes=error.minimum,
                       prepare_s=time.perf_counter() - started)
                continue
            except Exception as error:  # noqa: BLE001  (recorded in the row)
                finish(None, method, setting, error=error_text(error))
                continue
            finish(entry, method, setting)
        bar.set_description(f"{subject.label}: {method} at its least peak")
        try:
            finish(monet_least_entry(subject, arguments.time_limit, method), method,
                   "least peak")
        except Exception as error:  # noqa: BLE001  (recorded in the row)
            finish(None, method, "least peak", error=error_text(error))

    # Time every runnable method side by side, so that a busy neighbour slows all alike.
    bar.set_description(f"{subject.label}: timing {len(entries)} methods interleaved")
    steps = {
        f"{e.method} {e.setting}": backward_step(
            e.params_of, lambda e=e: e.forward(*inputs), inputs
        )
        for e in entries
    }
    times = compare_step_times(steps, repeats=arguments.repeats, warmup=1)
    eager_time = times[f"{EAGER} -"]
    for row in rows:
        timed = times.get(f"{row['method']} {row['setting']}")
        if timed is not None:
            # Ratios within a round: a neighbour's burst that spans the round cancels out.
            ratios = [t / e for t, e in zip(timed.times_s, eager_time.times_s)]
            row.update(
                step_s=timed.median_s, eager_step_s=eager_time.median_s,
                overhead=statistics.median(ratios), overhead_min=min(ratios),
                overhead_max=max(ratios), times_s=" ".join(f"{t:.4f}" for t in timed.times_s),
            )
        if row.get("peak_bytes") is not None:
            row["peak_over_eager"] = row["peak_bytes"] / eager_peak
    bar.write(f"{subject.label}: timed {len(steps)} methods, {arguments.repeats} interleaved "
              f"repeats, eager median {eager_time.median_s:.3f} s", file=sys.stderr)

    timelines = {"eager": eager.timeline or []}
    shown = next((e for e in entries
                  if e.method == MONET and e.setting == f"budget {TIMELINE_BUDGET:g}"), None)
    if shown is not None and shown.timeline:
        timelines[f"monet budget {TIMELINE_BUDGET:g}"] = shown.timeline
    if COMPILE in methods:
        torch._dynamo.reset()  # the next model must not meet this one's compiled code
    return rows, timelines


def progress_line(row: dict[str, Any], eager_peak: int | None) -> str:
    head = f"  {row['model']:<18} {row['method']:<17} {row['setting']:<19}"
    if row.get("peak_bytes") is None:
        return f"{head} {row.get('error', 'no measurement')}"
    ratio = "" if not eager_peak else f" ({row['peak_bytes'] / eager_peak:.2f} of eager)"
    grads = {True: "grads = eager", False: "GRADS DIFFER", None: "grads not compared"}
    return (f"{head} peak {row['peak_bytes'] / MIB:8.2f} MiB{ratio}, "
            f"{grads[row.get('grads_equal')]}, {row['wall_s']:.1f} s")


# ------------------------------------------------------------------ summary


def mib(size: float) -> str:
    """MiB with three significant digits or more: 98.9, 0.305."""
    value = size / MIB
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def number(value: Any, digits: int, scale: float = 1.0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value / scale:.{digits}f}{suffix}"


def measured(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("peak_bytes") is not None and r.get("overhead") is not None]


def cheapest(rows: list[dict[str, Any]], limit: float) -> dict[str, Any] | None:
    """The fastest row whose measured peak is at most ``limit`` bytes."""
    fitting = [r for r in measured(rows) if r["peak_bytes"] <= limit]
    return min(fitting, key=lambda r: r["overhead"]) if fitting else None


def summary_table(rows: list[dict[str, Any]]) -> str:
    """Per method: smallest peak, and the cheapest point within 0.7/0.5/0.35 of eager's peak."""
    eager_peak = next(r["peak_bytes"] for r in rows if r["method"] == EAGER)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    table = []
    best: dict[str, dict[float | str, dict[str, Any] | None]] = {}
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        points = measured(mine)
        if not points:
            reason = next((r.get("error") for r in mine if r.get("error")), "no measurement")
            table.append([method, "not run" if method == ROCKMATE else "-",
                          *["-"] * len(FRACTIONS), reason])
            continue
        least = min(points, key=lambda r: r["peak_bytes"])
        best[method] = {"least": least}
        share = least["peak_bytes"] / eager_peak
        cells = [f"{mib(least['peak_bytes'])} MiB ({share:.2f}, {least['setting']})"]
        for fraction in FRACTIONS:
            point = cheapest(mine, fraction * eager_peak)
            best[method][fraction] = point
            cells.append("infeasible" if point is None
                         else f"{point['overhead']:.2f}x ({point['setting']})")
        table.append([method, *cells, ""])
    if MONET in best:
        others = {m: b for m, b in best.items() if m not in (*MONETS, EAGER)}
        cells = []
        least_other = min((b["least"] for b in others.values()),
                          key=lambda r: r["peak_bytes"], default=None)
        cells.append("-" if least_other is None else
                     f"{best[MONET]['least']['peak_bytes'] / least_other['peak_bytes']:.2f}"
                     f" of {least_other['method']}'s")
        for fraction in FRACTIONS:
            mine = best[MONET][fraction]
            rivals = [b[fraction] for b in others.values() if b[fraction] is not None]
            rival = min(rivals, key=lambda r: r["overhead"], default=None)
            if mine is None:
                cells.append("monet infeasible" if rival is not None else "all infeasible")
            elif rival is None:
                cells.append("only monet fits")
            else:
                cells.append(f"{mine['overhead'] / rival['overhead']:.2f} of {rival['method']}'s")
        table.append(["monet / best other", *cells, ""])
    if MONET in best and MONET_CHECKPOINT in best:
        # What the operator variants add: joint against checkpoint-only, same solver.
        joint, alone = best[MONET], best[MONET_CHECKPOINT]
        cells = [f"{joint['least']['peak_bytes'] / alone['least']['peak_bytes']:.2f} of its peak"]
        for fraction in FRACTIONS:
            mine, theirs = joint[fraction], alone[fraction]
            cells.append("-" if mine is None or theirs is None
                         else f"{mine['overhead'] / theirs['overhead']:.2f} of its time")
        table.append(["monet / checkpoint-only", *cells, ""])
    header = ["method", "smallest peak (of eager, setting)",
              *[f"time at <= {f:g} of eager's peak" for f in FRACTIONS], "why not run"]
    return markdown_table(header, table)


def model_summary(rows: list[dict[str, Any]]) -> str:
    """The summary table, and the variants table where both monet methods ran."""
    return "\n\n".join(filter(None, (summary_table(rows), variants_table(rows))))


def variants_table(rows: list[dict[str, Any]]) -> str:
    """Joint against checkpoint-only at each setting both ran: measured peaks, the median
    over rounds of joint's step time over checkpoint-only's in the same round (a
    neighbour's burst hits both) with the interval that holds the true median at 90%
    or more (``median_interval``; five rounds: their range, 94%) and what it says,
    and the solver's predicted added time, which no round's noise blurs. Empty
    without both methods."""
    joint = {r["setting"]: r for r in rows if r["method"] == MONET}
    alone = {r["setting"]: r for r in rows if r["method"] == MONET_CHECKPOINT}
    table = []
    for setting in [s for s in joint if s in alone]:
        mine, theirs = joint[setting], alone[setting]
        ratio = "-"
        if mine.get("times_s") and theirs.get("times_s"):
            pairs = zip(str(mine["times_s"]).split(), str(theirs["times_s"]).split())
            ratios = [float(a) / float(b) for a, b in pairs]
            low, high, coverage = median_interval(ratios)
            verdict = ("faster" if high < 1 else "slower" if low > 1
                       else "no difference measured")
            ratio = (f"{statistics.median(ratios):.2f} ({low:.2f}-{high:.2f}, "
                     f"{coverage:.0%}): {verdict}")
        table.append([
            setting,
            number(mine.get("peak_bytes"), 1, MIB), number(theirs.get("peak_bytes"), 1, MIB),
            number(mine.get("overhead"), 2, suffix="x"),
            number(theirs.get("overhead"), 2, suffix="x"), ratio,
            number(mine.get("predicted_added_s"), 0, 1e-3),
            number(theirs.get("predicted_added_s"), 0, 1e-3),
            mine.get("variants") or mine.get("error") or "",
            "" if theirs.get("peak_bytes") is not None else theirs.get("error") or "",
        ])
    if not table:
        return ""
    header = ["setting", "peak MiB joint", "checkpoint-only", "time/eager joint",
              "checkpoint-only", "joint/checkpoint-only time (interval, coverage)",
              "predicted added ms joint", "checkpoint-only", "joint's variants / error",
              "checkpoint-only error"]
    return ("Operator variants: monet (joint) against monet checkpoint-only\n\n"
            + markdown_table(header, table))


def frontier_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        grads = {True: "yes", False: f"NO ({number(r.get('max_grad_diff'), 1)})",
                 None: "-"}[r.get("grads_equal")]
        if r.get("grads_note"):
            grads = r["grads_note"]
        table.append([
            r["method"], r["setting"], number(r.get("peak_bytes"), 2, MIB),
            number(r.get("peak_over_eager"), 3), number(r.get("step_s"), 3),
            number(r.get("overhead"), 2, suffix="x")
            + (f" ({r['overhead_min']:.2f}-{r['overhead_max']:.2f})"
               if r.get("overhead_min") is not None else ""),
            number(r.get("predicted_added_s"), 1, 1e-3),
            number(r.get("prepare_s"), 1),
            grads, r.get("variants") or "",
            "; ".join(str(r[k]) for k in ("error", "note") if r.get(k)),
        ])
    header = ["method", "setting", "peak MiB", "peak/eager", "median step s",
              "time/eager (range)", "predicted added ms", "solve/compile s", "grads = eager", "operator variants",
              "error / note"]
    return markdown_table(header, table)


# ------------------------------------------------------------------ figures


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)


def plot_frontier(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Measured peak against step time over eager's, one line per method."""
    eager_peak = next(r["peak_bytes"] for r in rows if r["method"] == EAGER)
    fig, ax = plt.subplots(figsize=(10, 5.5))
    for fraction in FRACTIONS:
        ax.axvline(fraction * eager_peak / MIB, color="0.75", linestyle=":", linewidth=1)
    ax.axhline(1.0, color="0.75", linewidth=1)
    for method in dict.fromkeys(r["method"] for r in rows):
        points = sorted(measured([r for r in rows if r["method"] == method]),
                        key=lambda r: r["peak_bytes"])
        if not points:
            continue
        colour, marker = STYLES.get(method, ("tab:gray", "x"))
        xs = [r["peak_bytes"] / MIB for r in points]
        ys = [r["overhead"] for r in points]
        ax.plot(xs, ys, color=colour, marker=marker, markersize=8, linewidth=1.5,
                label=method)
        for r, x, y in zip(points, xs, ys):
            if method != EAGER:
                ax.annotate(r["setting"].replace("budget ", ""), (x, y), fontsize=8,
                            color=colour, textcoords="offset points", xytext=(5, 5))
    top = ax.secondary_xaxis(
        "top", functions=(lambda x: x * MIB / eager_peak, lambda f: f * eager_peak / MIB)
    )
    top.set_xlabel("fraction of eager's peak (dotted: 0.7, 0.5, 0.35)")
    ax.set_xlabel(f"measured peak of one training step, MiB ({MEMORY_METHOD})")
    ax.set_ylabel("step time / eager's (median of per-round ratios)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    # Outside the axes: inside, it hides the labels of the points.
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def plot_timeline(
    timelines: dict[str, list[tuple[float, int]]], shown: dict[str, Any] | None, path: Path,
    title: str,
) -> None:
    """Live tensor memory through one step, per method, with monet's budget."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for (name, samples), colour in zip(timelines.items(), ("black", "tab:blue")):
        xs = [t for t, _ in samples]
        ys = [b / MIB for _, b in samples]
        ax.plot(xs, ys, drawstyle="steps-post", color=colour, linewidth=1.2,
                label=f"{name} (peak {mib(max(ys) * MIB)} MiB)")
    if shown is not None and shown.get("budget_bytes") is not None:
        budget = shown["budget_bytes"]
        missing = "" if shown.get("peak_bytes") is not None else f": {shown.get('error')}"
        ax.axhline(budget / MIB, color="tab:blue", linestyle="--", linewidth=1,
                   label=f"monet's budget, {mib(budget)} MiB{missing}")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("seconds since the step started (under the profiler)")
    ax.set_ylabel("live tensor memory, MiB")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, loc="upper right")  # the peak sits early: the corner is free
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


# ------------------------------------------------------------------ main


def fractions_arg(text: str) -> list[float]:
    """Comma-separated fractions in (0, 1]."""
    try:
        values = [float(item) for item in text.split(",") if item.strip()]
    except ValueError:
        values = []
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions in (0, 1], not {text!r}")
    return values


def build_parser(prog: str = "peers.py", output_dir: Path = RESULTS) -> argparse.ArgumentParser:
    """The script's options; ``monet bench`` and ``monet report`` pass their name and folder."""
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__.splitlines()[0],
        epilog="Models are zoo names or presets (" + ", ".join(PRESETS) + "), as "
               "NAME[:BATCH[:IMAGE]], before the options or after --models. Without "
               "--methods every method runs on every model.",
    )
    parser.add_argument("models", nargs="*", type=model_arg, metavar="MODEL",
                        help=f"models (default {' '.join(DEFAULT_MODELS)})")
    parser.add_argument("--models", nargs="+", type=model_arg, dest="more_models",
                        default=[], metavar="MODEL", help="more models (added to MODEL ...)")
    parser.add_argument("--methods", nargs="+", choices=list(METHOD_ARGS), default=None,
                        help="methods to run on every model (eager always runs)")
    parser.add_argument("--budgets", type=fractions_arg, default=fractions_arg(DEFAULT_BUDGETS),
                        help=f"monet's budgets, fractions of eager's peak (default "
                             f"{DEFAULT_BUDGETS})")
    parser.add_argument("--compile-budgets", type=fractions_arg,
                        default=fractions_arg(DEFAULT_COMPILE_BUDGETS),
                        help="activation_memory_budget values for torch.compile (default "
                             f"{DEFAULT_COMPILE_BUDGETS})")
    parser.add_argument("--compile-models", nargs="+", default=None, metavar="MODEL",
                        help="run torch.compile on these models only, as written in MODEL or "
                             "by zoo name (default: every model); the others get a row that "
                             "says so")
    parser.add_argument("--time-limit", type=float, default=10.0,
                        help="monet's solver seconds per budget (default 10)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="interleaved timed steps per method (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, 0 for torch's choice (default 1: with 2 threads "
                             "on a shared 2-core machine a busy neighbour swings step times "
                             "10x; with 1 they stay within about 10%%)")
    parser.add_argument("--output-dir", type=Path, default=output_dir,
                        help=f"where the files go (default {display_path(output_dir)})")
    return parser


def display_path(path: Path) -> str:
    """``path`` relative to the working directory where it lies under it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def parse_arguments(
    argv: list[str] | None, prog: str = "peers.py", output_dir: Path = RESULTS
) -> argparse.Namespace:
    """The options, with ``models`` the positional models, then ``--models``, else the defaults."""
    parser = build_parser(prog, output_dir)
    arguments = parser.parse_args(argv)
    if arguments.repeats < 1:
        parser.error("--repeats must be at least 1")
    arguments.models = (arguments.models + arguments.more_models
                        or [Case.parse(m) for m in DEFAULT_MODELS])
    del arguments.more_models
    labels = {case_label(case) for case in arguments.models}
    names = labels | {case.name for case in arguments.models}
    unknown = [m for m in arguments.compile_models or () if m not in names]
    if unknown:
        parser.error(f"--compile-models {' '.join(unknown)}: not among the models "
                     f"({' '.join(sorted(labels))})")
    arguments.prog = prog
    return arguments


def compiled_here(label: str, arguments: argparse.Namespace) -> bool:
    """Whether ``--compile-models`` (absent: every model) names the model ``label``."""
    names = arguments.compile_models
    return names is None or label in names or label.split(":")[0] in names


def methods_of(subject: Subject, arguments: argparse.Namespace) -> list[str]:
    """The methods that run on ``subject``: ``--methods`` (default all), eager first."""
    picked = METHOD_ARGS.values() if arguments.methods is None else (
        METHOD_ARGS[m] for m in arguments.methods)
    chosen = list(dict.fromkeys([EAGER, *picked]))
    if subject.reversible is None:
        # Only a RevViT has a reversible backward.
        chosen = [m for m in chosen if m not in (REVVIT, MONET_REVERSIBLE)]
    if COMPILE in chosen and not compiled_here(subject.label, arguments):
        chosen.remove(COMPILE)
        arguments.compile_skipped.add(subject.label)
    return chosen


def main(
    argv: list[str] | None = None, prog: str = "peers.py", output_dir: Path = RESULTS
) -> int:
    """Run every model's frontier, print the summary and write the files; the exit status.

    ``prog`` and ``output_dir`` are the name in the help and the default folder
    (``monet bench`` passes its own).
    """
    arguments = parse_arguments(argv, prog, output_dir)
    if arguments.threads > 0:
        torch.set_num_threads(arguments.threads)
    started = time.perf_counter()
    subjects = [build(case) for case in arguments.models]
    arguments.compile_skipped = set()
    plans = [methods_of(subject, arguments) for subject in subjects]

    def row_count(subject: Subject, chosen: list[str]) -> int:
        return (1 + 2 * (CHECKPOINT in chosen)
                + len(arguments.compile_budgets) * (COMPILE in chosen) + (ROCKMATE in chosen)
                + (subject.label in arguments.compile_skipped)
                + (REVVIT in chosen)
                + (len(arguments.budgets) + 1) * sum(m in chosen for m in MONETS))

    total = sum(row_count(s, c) for s, c in zip(subjects, plans))
    rows: list[dict[str, Any]] = []
    figures: list[tuple[str, Path, Path]] = []
    out = arguments.output_dir
    out.mkdir(parents=True, exist_ok=True)
    # A bar on a terminal; in a log, only the lines (the bar's redraws would clutter it).
    with tqdm(total=total, file=sys.stderr, unit="row", dynamic_ncols=True,
              disable=not sys.stderr.isatty()) as bar:
        for subject, chosen in zip(subjects, plans):
            bar.write(f"{subject.label}: batch {subject.batch}, inputs {shapes(subject.inputs)}, "
                      f"{subject.parameters / 1e6:.2f} M parameters; {', '.join(chosen)}",
                      file=sys.stderr)
            model_rows, timelines = run_model(subject, chosen, arguments, bar)
            rows.extend(model_rows)
            name = slug(subject.label)
            frontier_png, timeline_png = out / f"frontier_{name}.png", out / f"timeline_{name}.png"
            plot_frontier(model_rows, frontier_png,
                          f"{subject.label}, batch {subject.batch}: peak vs time, all methods "
                          "in one run")
            shown = next((r for r in model_rows if r["method"] == MONET
                          and r["setting"] == f"budget {TIMELINE_BUDGET:g}"), None)
            plot_timeline(timelines, shown, timeline_png, f"{subject.label}, batch {subject.batch}: memory through "
                          f"one step, eager vs monet at {TIMELINE_BUDGET:g} of eager's peak")
            figures.append((subject.label, frontier_png, timeline_png))
            summaries = {label: model_summary([r for r in rows if r["model"] == label])
                         for label, _, _ in figures}
            # After every model: a run stopped midway keeps the models it finished.
            write_outputs(arguments, argv, rows, summaries, figures,
                          time.perf_counter() - started, len(subjects))

    for label, table in summaries.items():
        print(f"\n{label}\n{table}")
    print(f"wrote {out}/frontier.csv, summary.md, report.md and {2 * len(figures)} figures",
          file=sys.stderr)
    return 0


def write_outputs(
    arguments: argparse.Namespace,
    argv: list[str] | None,
    rows: list[dict[str, Any]],
    summaries: dict[str, str],
    figures: list[tuple[str, Path, Path]],
    seconds: float,
    models: int,
) -> None:
    """frontier.csv, summary.md and report.md (which links the figures) of the models done."""
    out = arguments.output_dir
    columns = [
        "model", "batch", "inputs", "method", "setting", "peak_bytes", "peak_over_eager",
        "step_s", "eager_step_s", "overhead", "overhead_min", "overhead_max", "prepare_s", "solve_s", "budget_bytes",
        "predicted_peak_bytes", "predicted_added_s", "minimum_bytes", "status", "grads_equal", "max_grad_diff",
        "grads_note", "error", "note", "memory_method", "times_s", "wall_s",
    ]
    frame = pd.DataFrame(rows)
    frame = frame.reindex(columns=[c for c in columns if c in frame.columns]
                          + [c for c in frame.columns if c not in columns])
    frame.insert(6, "peak_mib", frame["peak_bytes"] / MIB)
    # Nullable integers: byte columns with gaps stay integers, not floats.
    frame.convert_dtypes().to_csv(out / "frontier.csv", index=False)

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    runner = "python benchmarks/peers.py" if arguments.prog == "peers.py" else arguments.prog
    command = f"{runner} " + " ".join(sys.argv[1:] if argv is None else argv)
    done = ("" if len(figures) == models
            else f" (written after {len(figures)} of {models} models)")
    compiled = ("every model" if arguments.compile_models is None
                else "only " + ", ".join(arguments.compile_models))
    notes = [
        f"date: {now}, {seconds:.0f} s in all{done}",
        f"machine: {machine()}",
        f"command: `{command.strip()}`",
        (f"peak memory, the same for every method: {MEMORY_METHOD} via "
        "monet.measure.measure_peak_memory; the whole step (parameters, gradients, inputs, "
        "activations, workspace) of forward + backward with unit output gradients, one step "
        "after a warm-up"),
        (f"step time: {arguments.repeats} rounds in which every method of a model runs one "
         "step in turn (monet.measure.compare_step_times, time.perf_counter, one warm-up "
         "round); median step s = the median over rounds; time/eager = the median over rounds "
         "of the method's time over eager's in the same round (range: smallest and largest), "
         "so that a neighbour's burst that spans a round cancels. "
         f"{torch.get_num_threads()} torch thread(s): on this shared 2-core machine 2 threads "
         "swung an eager step from 0.17 to 3 s while a neighbour ran, 1 thread stayed within "
         "about 10%"),
        ("checkpoint: torch.utils.checkpoint.checkpoint(block, ..., use_reentrant=False) around "
        "every / every 2nd child of the longest nn.Sequential/nn.ModuleList of same-type "
        "children (and of any other container of that type), on a copy of the model"),
        (f"torch.compile: on {compiled}, activation_memory_budget "
        f"{', '.join(f'{b:g}' for b in arguments.compile_budgets)}; "
        "default inductor, one backend per activation_memory_budget (with a "
        "shared backend dynamo reuses the first copy's code for every later copy, so later "
        "budgets never apply), the config patched around the compile and first step; "
        "solve/compile s = that first step (inductor's on-disk FX-graph and AOTAutograd "
        "caches turn a repeat run's tens of seconds into a few)"),
        "rockmate: not run, the row says why",
        ("revvit reversible: the RevViT with its reversible backward; eager and every other "
        "method run the same weights under plain autograd (model.twin(reversible=False))"),
        ("monet: budget f = f x eager's measured peak in bytes (monet.optimize with its default "
        f"measure=True, solver limit {arguments.time_limit:g} s); solve/compile s = capture + "
        "profile + solve + lower (its per-operator profile cache on disk may be warm too)"),
        (f"grads = eager: one step (seed fixed, dropout active, cross-entropy on random labels) "
        f"of each method and of a copy of eager, every parameter gradient "
        f"torch.allclose(rtol={RTOL}, atol={ATOL}); torch.compile with atol={COMPILE_ATOL} "
        f"(inductor reorders float arithmetic) and monet rows that run operator variants with "
        f"atol={VARIANT_ATOL} (another kernel, a norm's input rebuilt from its output), and not "
        "compared where the model draws random "
        "numbers (inductor's dropout masks are not eager's)"),
        ("joint/checkpoint-only time: the median over rounds of monet's step time over monet "
        "checkpoint-only's in the same round, the interval of those ratios that holds their true "
        "median at the coverage given (monet.measure.median_interval, the sign test's order "
        "statistics), and what it says: faster or slower where it excludes 1"),
        ("summary: for every method the fastest measured point whose measured peak is at most "
        "the fraction of eager's peak; monet / best other = monet's time over the fastest "
        "other method's at that fraction (below 1: monet is faster)"),
    ]
    header = "".join(f"- {note}\n" for note in notes)
    summary = "# Peers: summary\n\n" + header + "".join(
        f"\n## {label}\n\n{table}\n" for label, table in summaries.items()
    )
    (out / "summary.md").write_text(summary)
    report = ["# Peers: monet beside what a user would pick instead\n", header]
    for label, frontier_png, timeline_png in figures:
        model_rows = [r for r in rows if r["model"] == label]
        report += [
            f"\n## {label}\n",
            summaries[label] + "\n",
            f"![frontier of {label}]({frontier_png.name})\n",
            f"![memory timeline of {label}]({timeline_png.name})\n",
            frontier_table(model_rows) + "\n",
        ]
    report.append("\nFiles: [frontier.csv](frontier.csv), [summary.md](summary.md).\n")
    (out / "report.md").write_text("\n".join(report))


if __name__ == "__main__":
    sys.exit(main())
