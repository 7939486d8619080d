"""Run: ``MonetModule``, an ``nn.Module`` that trains through a memory plan.

Each input signature (shapes, dtypes, devices, which tensors require grad,
non-tensor arguments, the parameters' dtypes and devices) gets its own plan,
made on first use and cached: the joint graph is captured, profiled, solved
and lowered inside AOTAutograd's partition step, and AOTAutograd's runtime
executes the lowered forward and backward graphs in one autograd function.
Parameters and buffers stay the user's own tensors: they are read at every
call, so optimisers, ``state_dict`` and ``.to()`` work as before. In eval mode
or under ``torch.no_grad()`` the wrapped module runs as it is.
"""

from __future__ import annotations

import dataclasses
import enum
import numbers
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from monet.capture import CompiledStep, JointGraph, compile_step, flat_tensors, preserved_state
from monet.config import Config
from monet.graph import analyse
from monet.lower import lower
from monet.profile import ProfileCache, profile
from monet.simulate import Simulation, program_of_graphs, simulate
from monet.solver import Problem, Schedule, build_program, eager_like, solve
from monet.solver.schedule import InfeasibleBudgetError, format_bytes


@dataclass
class Plan:
    """One input signature's plan and what was measured about it."""

    key: tuple
    step: CompiledStep
    problem: Problem
    schedule: Schedule
    simulation: Simulation
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall seconds per stage: capture+analyse, profile, solve, lower."""
    measured_peak: int | None = None
    measurement_method: str = ""
    step_seconds: float | None = None
    """Median step time of the plan, measured beside eager's."""
    eager_step_seconds: float | None = None
    requested_budget: int | None = None
    """The user's budget in bytes (a re-plan solves for less to make the measurement fit)."""
    reserved: int = 0
    """Bytes of the user's budget held back for memory monet does not plan (``reserve=``)."""
    in_place: tuple[str, ...] = ()
    """Ops that write over a value nothing reads after them: backward ones over a gradient,
    forward activations over their input (every schedule runs them so)."""


_CONSTANTS = (
    type(None), numbers.Number, str, bytes, enum.Enum, type(...),
    torch.dtype, torch.device, torch.layout, torch.memory_format,
)
"""Non-tensor arguments a plan can be keyed on: immutable, and equal when their reprs are."""


def module_attributes(model: nn.Module, volatile: frozenset = frozenset()) -> dict:
    """Public number, string and flag attributes of every submodule (``self.scale``, a
    flag steering the forward): tracing bakes them into the graph. ``volatile`` ones
    (counters that change on every call) are left out."""
    found = {}
    for index, module in enumerate(model.modules()):
        for name, value in vars(module).items():
            key = (index, name)
            if name.startswith("_") or name == "training" or key in volatile:
                continue
            if isinstance(value, _CONSTANTS):
                found[key] = (type(value).__name__, repr(value))
    return found


def signature(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    volatile: frozenset = frozenset(),
    attributes: dict | None = None,
) -> tuple:
    """What a plan is specific to: everything that changes the captured graph.

    ``attributes``: ``module_attributes(model, volatile)`` when the caller has it.
    """
    leaves, spec = pytree.tree_flatten((args, kwargs))

    def describe(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return ("tensor", tuple(x.shape), x.dtype, str(x.device), x.requires_grad)
        if not isinstance(x, _CONSTANTS):
            _refuse_constant(x, args, kwargs)
        return ("constant", type(x).__name__, repr(x))

    params = tuple(
        (name, p.dtype, str(p.device), p.requires_grad, tuple(p.shape))
        for name, p in model.named_parameters()
    )
    buffers = tuple((name, b.dtype, str(b.device), tuple(b.shape)) for name, b in model.named_buffers())
    # Autocast changes the captured graph (casts, dtypes of saved values).
    autocast = tuple(
        (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        for device in ("cpu", "cuda")
    )
    # A submodule switched to eval (a frozen batch-norm, dropout off) traces another graph.
    modes = tuple(m.training for m in model.modules())
    if attributes is None:
        attributes = module_attributes(model, volatile)
    return (
        str(spec), tuple(describe(x) for x in leaves), params, buffers, autocast, modes,
        tuple(sorted(attributes.items())),
    )


def _refuse_constant(value: Any, args: tuple, kwargs: dict) -> None:
    """A non-tensor argument that could change without its repr changing (an array, an
    object with attributes) would silently reuse a plan made for another value."""
    where = "an argument"
    for name, tree in (("args", args), ("kwargs", kwargs)):
        for path, leaf in pytree.tree_flatten_with_path(tree)[0]:
            if leaf is value:
                where = name + pytree.keystr(path)
    raise TypeError(
        f"monet cannot take the {type(value).__module__}.{type(value).__qualname__} passed as "
        f"{where}: non-tensor arguments are baked into the plan, which is reused only where they "
        "are equal, and monet can tell that only for None, numbers, strings, bytes, enums and "
        "torch dtypes and devices; pass arrays as torch tensors"
    )


def _requires_grad(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a call builds an autograd graph: some parameter or tensor input requires grad."""
    return any(p.requires_grad for p in model.parameters()) or any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in pytree.tree_leaves((args, kwargs))
    )


def ddp_bucket_bytes(model: nn.Module) -> int:
    """Bytes of the gradient buckets ``DistributedDataParallel(model)`` keeps on each rank.

    DDP copies every gradient into flat buckets (one element per element of each
    parameter that requires grad) that live from its construction on, outside
    the step monet plans. Pass this as ``monet.optimize(..., reserve=)`` so that
    a DDP rank's peak stays within the budget. With
    ``gradient_as_bucket_view=True`` the gradients live inside the buckets, but
    the buckets exist from the start of the step while monet's plan counts each
    gradient from when the backward makes it, so the same reserve is needed
    (it over-reserves by the gradients alive at the plan's peak).
    """
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def backward_step(
    model: nn.Module, forward: Callable[[], Any], inputs: Any = ()
) -> Callable[[], None]:
    """A training step for measurements: forward, then backward with unit output gradients.

    Gradients start from None (as after ``zero_grad()``), so each step allocates them.
    """
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]

    def step() -> None:
        for t in [*model.parameters(), *leaves]:
            t.grad = None
        outputs = [
            o for o in pytree.tree_leaves(forward())
            if isinstance(o, torch.Tensor) and o.requires_grad
        ]
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])
        del outputs

    return step


class MonetModule(nn.Module):
    """Wraps a module so that its training steps run within a memory budget.

    Made by :func:`monet.optimize`; ``report()`` says what the last plan
    predicted and measured.
    """

    def __init__(
        self,
        module: nn.Module,
        budget: Callable[[tuple, dict], Callable[[int], int]],
        config: Config,
        schedule_path: str | Path | None = None,
        reserve: int = 0,
    ):
        super().__init__()
        self.module = module
        self._budget = budget
        self._reserve = reserve
        self._config = config
        self._schedule_path = schedule_path
        self._plans: dict[tuple, Plan] = {}
        self._last_plan: Plan | None = None
        # Attributes that changed on several calls in a row (a step counter): not part
        # of a plan's key, or every call would plan again.
        self._volatile: frozenset = frozenset()
        self._attribute_changes: dict[tuple, int] = {}
        self._last_attributes: dict | None = None
        self._cache = ProfileCache(config.profile_cache)

    # ----------------------------------------------------------------- nn.Module
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if (
            not self.training
            or not torch.is_grad_enabled()
            or not _requires_grad(self.module, args, kwargs)
        ):
            return self.module(*args, **kwargs)
        attributes = self._watch_attributes()
        key = signature(self.module, args, kwargs, self._volatile, attributes)
        plan = self._plans.get(key)
        if plan is None:
            plan = self.plan(*args, **kwargs)
        self._last_plan = plan
        return plan.step(self.module, args, kwargs)

    VOLATILE_AFTER = 3
    """Calls in a row an attribute may change before it counts as a counter."""

    def _watch_attributes(self) -> dict:
        """The module's attributes now (as they key plans); counts the ones that keep changing."""
        current = module_attributes(self.module, self._volatile)
        previous, self._last_attributes = self._last_attributes, current
        if previous is None:
            return current
        for key, value in current.items():
            if previous.get(key, value) == value:
                self._attribute_changes.pop(key, None)
                continue
            self._attribute_changes[key] = self._attribute_changes.get(key, 0) + 1
            if self._attribute_changes[key] >= self.VOLATILE_AFTER:
                self._make_volatile({key}, f"it changed on {self.VOLATILE_AFTER} calls in a row")
        return {k: v for k, v in current.items() if k not in self._volatile}

    def _make_volatile(self, keys: set, why: str) -> None:
        self._volatile |= keys
        modules = list(self.module.modules())
        names = ", ".join(sorted(f"{type(modules[i]).__name__}.{name}" for i, name in keys))
        warnings.warn(
            f"monet: {names}: {why}, so it no longer keys the plan (or every call would "
            "plan again); if the forward's computation depends on it, the plan keeps the "
            "value it was made with",
            stacklevel=4,
        )

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    # -------------------------------------------------------------------- plans
    @property
    def plans(self) -> dict[tuple, Plan]:
        return self._plans

    @property
    def last_plan(self) -> Plan | None:
        return self._last_plan

    def plan(self, *args: Any, **kwargs: Any) -> Plan:
        """Make (or return) the plan for these inputs, measuring it if configured."""
        key = signature(self.module, args, kwargs, self._volatile)
        if key in self._plans:
            return self._plans[key]
        before = module_attributes(self.module, self._volatile)
        try:
            plan = self._plan_within_budget(key, args, kwargs)
        except InfeasibleBudgetError as error:
            if self._reserve:
                error.add_note(
                    f"monet planned the step for the budget less the reserve of "
                    f"{format_bytes(self._reserve)} ({self._reserve} bytes) held back for memory "
                    "it does not plan: add the reserve to the budgets above"
                )
            raise
        # Planning ran the forward: attributes it changed are the forward's own state
        # (a call counter), not a setting: they must not key the plan.
        after = module_attributes(self.module, self._volatile)
        changed = {k for k, v in after.items() if before.get(k, v) != v}
        if changed:
            self._make_volatile(changed, "the forward itself changes it")
            key = signature(self.module, args, kwargs, self._volatile)
            plan = dataclasses.replace(plan, key=key)
        self._last_attributes = module_attributes(self.module, self._volatile)
        self._plans[key] = plan
        self._last_plan = plan
        return plan

    def _plan_within_budget(self, key: tuple, args: tuple, kwargs: dict) -> Plan:
        plan = self._make_plan(key, args, kwargs, self._budget(args, kwargs))
        budget = plan.problem.budget
        if self._config.measure:
            self._measure(plan, args, kwargs)
            attempts = 0
            while plan.measured_peak > budget and attempts < self._config.replan_attempts:
                # The model of memory missed something the device allocates: take
                # the excess off the budget and plan again.
                attempts += 1
                excess = plan.measured_peak - plan.schedule.predicted_peak
                tighter = budget - max(excess, plan.measured_peak - budget)
                self._note(f"measured peak {format_bytes(plan.measured_peak)} is over the budget; "
                           f"re-planning at {format_bytes(tighter)}")
                plan = self._make_plan(key, args, kwargs, tighter)
                self._measure(plan, args, kwargs)
            if plan.measured_peak > budget:
                raise InfeasibleBudgetError(budget, plan.measured_peak)
        plan.requested_budget = budget + self._reserve
        plan.reserved = self._reserve
        return plan

    def _note(self, message: str) -> None:
        if self._config.progress:
            print(f"monet: {message}", file=sys.stderr)

    def _make_plan(
        self, key: tuple, args: tuple, kwargs: dict, budget: int | Callable[[int], int]
    ) -> Plan:
        """Capture, profile, solve and lower for these inputs.

        ``budget`` is bytes, or a function of the keep-everything plan's peak.
        """
        config = self._config
        seconds: dict[str, float] = {}
        result: dict[str, Any] = {}
        started = time.perf_counter()

        def partition(joint: JointGraph) -> tuple[fx.GraphModule, fx.GraphModule]:
            t = time.perf_counter()
            seconds["capture"] = t - started
            analysed = analyse(
                joint, config.variants, config.lossy_variants, config.kernel_variants,
                config.attention_variants,
            )
            if joint.real_primals is None:
                raise RuntimeError("monet: the real inputs were not handed to the partitioner")
            problem, stats = profile(
                analysed, joint.real_primals, self._cache, config.profile_repeats, config.progress
            )
            resolved = budget if isinstance(budget, int) else budget(eager_like(problem).predicted_peak)
            problem = Problem(
                problem.nodes, problem.storage_bytes, problem.graph_hash,
                type(self.module).__name__, resolved,
                {"device": str(joint.real_primals[0].device), "profiled_ops": stats.measured,
                 "cached_ops": stats.cached},
                problem.choices,
            )
            seconds["profile"] = time.perf_counter() - t
            t = time.perf_counter()
            if self._schedule_path is not None:
                schedule = Schedule.load(self._schedule_path, problem)
                if schedule.predicted_peak > resolved:
                    raise InfeasibleBudgetError(resolved, schedule.predicted_peak)
                schedule = dataclasses.replace(schedule, budget=resolved)
            else:
                progress = (lambda line: print(line, file=sys.stderr)) if config.progress else None
                schedule = solve(problem, resolved, config.time_limit, progress=progress)
            seconds["solve"] = time.perf_counter() - t
            t = time.perf_counter()
            program = build_program(problem, schedule)
            forward_graph, backward_graph = lower(analysed, program, problem.choices)
            names = {n.name: i for n, i in analysed.index.items()}
            simulation = simulate(
                problem,
                program_of_graphs(
                    problem, names, forward_graph.graph, backward_graph.graph,
                    joint.num_forward_outputs, program.variants,
                ),
            )
            if config.check_simulation and simulation.peak != schedule.predicted_peak:
                raise AssertionError(
                    f"monet: the lowered graphs peak at {simulation.peak} bytes but the schedule "
                    f"predicted {schedule.predicted_peak}: lowering and program disagree"
                )
            seconds["lower"] = time.perf_counter() - t
            result.update(problem=problem, schedule=schedule, simulation=simulation,
                          in_place=tuple(r.node.name for r in analysed.in_place))
            return forward_graph, backward_graph

        step = compile_step(self.module, args, kwargs, partition)
        # Planning runs one forward; undo what it does to buffers and the RNG.
        with preserved_state(self.module, (args, kwargs)):
            step(self.module, args, kwargs)
        if "schedule" not in result:
            raise RuntimeError(
                "monet: nothing to plan: no parameter or input requires grad, so the step "
                "has no backward"
            )
        return Plan(key, step, result["problem"], result["schedule"], result["simulation"], seconds,
                    in_place=result["in_place"])

    def _measure(self, plan: Plan, args: tuple, kwargs: dict) -> None:
        from monet.measure import compare_step_times, measure_peak_memory

        module = self.module
        resident = flat_tensors(module, args, kwargs)[0]
        monet_step = backward_step(module, lambda: plan.step(module, args, kwargs), (args, kwargs))
        eager_step = backward_step(module, lambda: module(*args, **kwargs), (args, kwargs))
        with preserved_state(module, (args, kwargs)):
            monet_step()  # warm: AOTAutograd compiles the backward lazily
            measurement = measure_peak_memory(monet_step, resident)
            plan.measured_peak = measurement.peak_bytes
            plan.measurement_method = measurement.method
            if self._config.timing_repeats > 0:
                times = compare_step_times(
                    {"eager": eager_step, "monet": monet_step},
                    repeats=self._config.timing_repeats,
                    warmup=1,
                )
                plan.step_seconds = times["monet"].median_s
                plan.eager_step_seconds = times["eager"].median_s
