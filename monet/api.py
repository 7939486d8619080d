"""``monet.optimize``: a module that trains within a memory budget at the least added time."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from monet.capture import flat_tensors, preserved_state
from monet.config import Config
from monet.runtime import MonetModule, Plan, backward_step, signature
from monet.solver.schedule import format_bytes

_UNITS = {
    "b": 1, "": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
    "k": 2**10, "m": 2**20, "g": 2**30,
}


def parse_budget(budget: Any) -> tuple[str, float]:
    """``("bytes", n)`` or ``("fraction", f)``; a clear ValueError for anything else.

    An int is bytes; a float in (0, 1] is a fraction of the unoptimised step's
    peak; a string is a number with a unit (``"6GiB"``, ``"512MB"``, ``"300 MiB"``).
    """
    # Every malformed budget is a ValueError, whatever its type: one thing to catch.
    if isinstance(budget, bool):
        raise ValueError(  # noqa: TRY004
            f"budget must be bytes, a fraction or a string with units, not {budget!r}"
        )
    if isinstance(budget, int):
        if not 0 < budget < 2**62:
            raise ValueError(f"budget must be a positive number of bytes below 2**62, not {budget}")
        return "bytes", float(budget)
    if isinstance(budget, float):
        if not math.isfinite(budget) or not 0 < budget <= 1:
            raise ValueError(
                f"a float budget is a fraction of the unoptimised peak in (0, 1], not {budget}; "
                "give bytes as an int or a string such as '6GiB'"
            )
        return "fraction", budget
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", budget)
        if not match:
            raise ValueError(f"cannot read the budget {budget!r}: expected e.g. '6GiB' or '512MB'")
        number, unit = float(match.group(1)), match.group(2).lower()
        if unit not in _UNITS:
            raise ValueError(
                f"unknown unit {match.group(2)!r} in budget {budget!r}; "
                "use B, KB, MB, GB, KiB, MiB or GiB"
            )
        value = number * _UNITS[unit]
        if not math.isfinite(value) or not 1 <= value < 2**62:
            raise ValueError(f"budget {budget!r} is not a positive size")
        return "bytes", float(int(value))
    raise ValueError(f"budget must be bytes, a fraction or a string with units, not {budget!r}")


@dataclasses.dataclass
class Report:
    """What a plan predicted and what was measured; ``str()`` for people, ``as_dict()`` for programs."""

    eager_peak: int | None
    budget: int
    predicted_peak: int
    measured_peak: int | None
    measurement_method: str
    predicted_overhead_seconds: float
    eager_step_seconds: float | None
    step_seconds: float | None
    solve_seconds: float
    solver_status: str
    solver_backend: str
    bound: float | None
    gap: float | None
    kept: int
    recomputed: int
    nodes: int
    stage_seconds: dict[str, float]
    variants: dict[str, str] = dataclasses.field(default_factory=dict)
    """Op (joint-graph node) → the implementation it runs, where not the captured one."""
    variant_sites: int = 0
    """Ops that had alternative implementations to choose from."""
    lossy: tuple[str, ...] = ()
    """Ops of ``variants`` whose implementation changes results beyond float rounding
    (asked for with ``lossy_variants``): their gradients are not eager's."""
    in_place: tuple[str, ...] = ()
    """Backward pointwise ops that write over a gradient dying with them (with variants on,
    every schedule runs them so; bit for bit the captured ops)."""
    activations_in_place: tuple[str, ...] = ()
    """Forward ReLUs (or hardtanhs) that write over an input nothing else reads after them
    (with variants on, every schedule runs them so; bit for bit the captured ops)."""

    @property
    def overhead(self) -> float | None:
        """Measured step time over eager's, minus one (same run, interleaved)."""
        if self.step_seconds is None or not self.eager_step_seconds:
            return None
        return self.step_seconds / self.eager_step_seconds - 1

    def as_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["overhead"] = self.overhead
        return data

    def __str__(self) -> str:
        def size(x: int | None) -> str:
            return "not measured" if x is None else format_bytes(x)

        lines = [
            "monet plan",
            f"  eager peak        {size(self.eager_peak)}",
            f"  budget            {size(self.budget)}",
            f"  predicted peak    {size(self.predicted_peak)}",
            f"  measured peak     {size(self.measured_peak)}"
            + (f"  ({self.measurement_method})" if self.measured_peak is not None else ""),
        ]
        if self.overhead is not None:
            lines.append(
                f"  step time         {self.step_seconds:.3f} s vs eager {self.eager_step_seconds:.3f} s"
                f"  (overhead {100 * self.overhead:+.1f}%, medians, interleaved)"
            )
        lines.append(
            f"  added time        {1000 * self.predicted_overhead_seconds:.2f} ms (predicted: "
            "recomputation and variants)"
        )
        gap = "" if self.gap is None else f", gap {100 * self.gap:.2f}%"
        lines.append(
            f"  solver            {self.solver_backend} {self.solver_status} in "
            f"{self.solve_seconds:.2f} s{gap}"
        )
        lines.append(
            f"  schedule          {self.kept} storages kept, {self.recomputed} ops recomputed, "
            f"{self.nodes} graph nodes"
        )
        lines.append(
            f"  variants          {len(self.variants)} of {self.variant_sites} ops run another "
            "implementation"
        )
        lines += [f"    {op:<30} {name}" + ("  (lossy)" if op in self.lossy else "")
                  for op, name in sorted(self.variants.items())]
        if self.lossy:
            lines.append(f"  lossy             {len(self.lossy)} ops change results beyond float "
                         "rounding: gradients differ from eager's")
        if self.in_place:
            lines.append(f"  in place          {len(self.in_place)} backward ops write over a "
                         "gradient that dies with them")
        if self.activations_in_place:
            lines.append(f"  in place          {len(self.activations_in_place)} forward "
                         "activations write over an input nothing else reads")
        return "\n".join(lines)


class _Budget:
    """Resolves the budget for one input signature, measuring eager's peak when needed."""

    def __init__(self, model: nn.Module, kind: str, value: float, measure: bool, reserve: int = 0):
        self.model = model
        self.kind = kind
        self.value = value
        self.measure = measure
        self.reserve = reserve
        self.eager_peaks: dict[tuple, int] = {}

    def eager_peak(self, args: tuple, kwargs: dict) -> int:
        from monet.measure import measure_peak_memory

        key = signature(self.model, args, kwargs)
        if key not in self.eager_peaks:
            step = backward_step(self.model, lambda: self.model(*args, **kwargs), (args, kwargs))
            with preserved_state(self.model, (args, kwargs)):
                step()  # warm-up: first calls allocate lazily-initialised state
                measured = measure_peak_memory(step, flat_tensors(self.model, args, kwargs)[0])
            self.eager_peaks[key] = measured.peak_bytes
        return self.eager_peaks[key]

    def __call__(self, args: tuple, kwargs: dict) -> Callable[[int], int]:
        """Measure eager's peak now if needed; return eager-like plan's peak → budget in bytes.

        A fraction is of the unoptimised step's peak: the larger of eager's measured
        peak and monet's plan closest to eager (:func:`monet.solver.eager_like`: it
        counts the step's outputs and their gradients as live to the end, so it can
        exceed eager's by those bytes), plus the reserve. The reserve is then taken off
        what the plan may use.
        """
        if self.kind == "fraction" or self.measure:
            peak = self.eager_peak(args, kwargs)
            if self.kind == "fraction":
                return lambda keep_all_peak: (
                    int((max(peak, keep_all_peak) + self.reserve) * self.value) - self.reserve
                )
        return lambda keep_all_peak: int(self.value) - self.reserve


class OptimizedModule(MonetModule):
    """The module ``optimize`` returns: a MonetModule with ``report()``."""

    def report(self) -> Report:
        """Eager peak, budget, predicted and measured peak, overhead and solve time of the last plan."""
        plan: Plan | None = self.last_plan
        if plan is None:
            raise RuntimeError("no plan yet: call the module in training mode first")
        budget_resolver: _Budget = self._budget
        eager = budget_resolver.eager_peaks.get(plan.key)
        schedule = plan.schedule
        phase = {n.name: n.phase for n in plan.problem.nodes}
        return Report(
            eager_peak=eager,
            budget=int(plan.requested_budget or plan.problem.budget),
            predicted_peak=schedule.predicted_peak,
            measured_peak=plan.measured_peak,
            measurement_method=plan.measurement_method,
            predicted_overhead_seconds=schedule.predicted_overhead,
            eager_step_seconds=plan.eager_step_seconds,
            step_seconds=plan.step_seconds,
            solve_seconds=schedule.solve_seconds,
            solver_status=schedule.status,
            solver_backend=schedule.backend,
            bound=schedule.bound,
            gap=schedule.gap,
            kept=len(schedule.kept),
            recomputed=len(schedule.recompute),
            nodes=len(plan.problem.nodes),
            stage_seconds=dict(plan.seconds),
            variants={
                choice.name: choice.alternatives[picked].name
                for choice, picked in zip(plan.problem.choices, schedule.variants)
                if picked
            },
            variant_sites=len(plan.problem.choices),
            lossy=tuple(
                choice.name
                for choice, picked in zip(plan.problem.choices, schedule.variants)
                if picked and choice.alternatives[picked].lossy
            ),
            in_place=tuple(name for name in plan.in_place if phase[name] == "backward"),
            activations_in_place=tuple(name for name in plan.in_place
                                       if phase[name] == "forward"),
        )


def optimize(
    model: nn.Module,
    budget: float | str,
    example_inputs: tuple | None = None,
    example_kwargs: dict | None = None,
    *,
    config: Config | None = None,
    schedule: str | Path | None = None,
    reserve: int | str = 0,
    **settings: Any,
) -> OptimizedModule:
    """A module that trains like ``model`` with each step's peak memory within ``budget``.

    ``budget``: bytes (int), a string with units (``"6GiB"``), or a fraction of
    the unoptimised step's measured peak (``0.5``). It bounds the whole step as
    the device sees it: parameters, gradients, activations and workspace.
    ``example_inputs`` (a tuple of the forward's arguments) makes the plan now,
    so that an impossible budget fails here; otherwise the first training call
    makes it. ``schedule`` loads a saved schedule instead of solving.
    ``reserve`` (bytes, or a string with units) is held back from the budget for
    memory monet does not plan, e.g. DDP's gradient buckets: pass
    ``monet.ddp_bucket_bytes(model)`` when the result goes into
    ``DistributedDataParallel``. Keyword ``settings`` override fields of
    :class:`monet.config.Config`.
    """
    kind, value = parse_budget(budget)
    reserved = 0
    if reserve != 0:
        reserve_kind, reserve_bytes = parse_budget(reserve)
        if reserve_kind != "bytes":
            raise ValueError(f"reserve is bytes (an int or a string such as '64MiB'), not {reserve!r}")
        reserved = int(reserve_bytes)
        if kind == "bytes" and reserved >= value:
            raise ValueError(
                f"reserve {format_bytes(reserved)} leaves nothing of the budget {format_bytes(int(value))}"
            )
    if not isinstance(model, nn.Module):
        raise TypeError(f"monet.optimize takes an nn.Module, not {type(model).__name__}")
    config = dataclasses.replace(config or Config(), **settings)
    resolver = _Budget(model, kind, value, config.measure, reserved)
    optimized = OptimizedModule(model, resolver, config, schedule, reserved)
    if example_inputs is not None:
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        if model.training and torch.is_grad_enabled():
            optimized.plan(*example_inputs, **(example_kwargs or {}))
    return optimized
