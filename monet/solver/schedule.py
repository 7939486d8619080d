"""The solver's answer: what to keep, what to recompute and where, and its predicted cost."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monet.solver.problem import (
    FORMAT_VERSION,
    Problem,
    ProblemFileError,
    _expect,
    _is_int,
    check_variants,
    finite_number,
    read_json,
    write_json_atomic,
)

STATUSES = ("optimal", "feasible", "heuristic", "infeasible")


class InfeasibleBudgetError(ValueError):
    """No schedule fits the budget; says the smallest budget that does."""

    def __init__(
        self,
        budget: int,
        minimum: int | None,
        lower_bound: int | None = None,
        searched: float | None = None,
    ):
        self.budget = budget
        self.minimum = minimum
        self.lower_bound = lower_bound
        self.proven = searched is None
        if searched is not None:
            # The solver ran out of time before settling it: say exactly that.
            super().__init__(
                f"no schedule within budget {format_bytes(budget)} ({budget} bytes) was found "
                f"in {searched:.1f} s; the smallest found is {format_bytes(minimum or 0)} "
                f"({minimum} bytes) and none below {format_bytes(lower_bound or 0)} can work. "
                "Raise the time limit or the budget."
            )
            return
        if minimum is None:
            detail = "and no feasible budget was found within the time limit"
        else:
            detail = f"the smallest budget found feasible is {format_bytes(minimum)} ({minimum} bytes)"
            if lower_bound is not None and lower_bound < minimum:
                detail += f"; none below {format_bytes(lower_bound)} can work"
        super().__init__(f"budget {format_bytes(budget)} ({budget} bytes) cannot be met: {detail}")


@dataclass(frozen=True)
class Schedule:
    """Which forward storages are kept, which ops are recomputed in which backward slot.

    A backward *slot* ``j`` is the moment just before the ``j``-th backward node
    runs; recomputations in that slot run in forward order.
    """

    graph_hash: str
    budget: int | None
    kept: tuple[int, ...]
    """Storage indices kept from the forward to the backward."""
    recompute: tuple[tuple[int, int], ...]
    """(node index of the op, backward slot) pairs."""
    predicted_peak: int
    """Peak bytes of the whole step, computed by the simulator for this schedule."""
    predicted_overhead: float
    """Seconds of recomputation added to the step."""
    status: str
    """``optimal``, ``feasible`` (time limit hit), ``heuristic`` or ``infeasible``."""
    backend: str = ""
    bound: float | None = None
    """Lower bound on the added seconds (from the solver), when known."""
    solve_seconds: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)
    variants: tuple[int, ...] = ()
    """The alternative chosen for each of the problem's choices (empty: it has none)."""
    floor: float = 0.0
    """Added seconds of the fastest schedule there is, budget aside: every operator on its
    fastest variant, nothing recomputed. Negative when variants are faster than the
    captured ops; the added time and its bound are never below it."""

    @property
    def gap(self) -> float | None:
        """Relative gap between the schedule's added time and the bound, both measured
        from the floor (so variants that save time do not make it meaningless)."""
        if self.bound is None:
            return None
        span = self.predicted_overhead - self.floor
        if span <= 0:
            return 0.0
        bound = max(self.bound, self.floor)
        return min(1.0, max(0.0, (self.predicted_overhead - bound) / span))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "monet.schedule",
            "version": FORMAT_VERSION,
            "graph_hash": self.graph_hash,
            "budget": self.budget,
            "kept": list(self.kept),
            "recompute": [list(pair) for pair in self.recompute],
            "predicted_peak": self.predicted_peak,
            "predicted_overhead": self.predicted_overhead,
            "status": self.status,
            "backend": self.backend,
            "bound": self.bound,
            "solve_seconds": self.solve_seconds,
            "meta": self.meta,
            "variants": list(self.variants),
            "floor": self.floor,
        }

    @classmethod
    def from_json(cls, data: Any, problem: Problem | None = None) -> Schedule:
        _expect(isinstance(data, dict), "schedule", "a JSON object")
        _expect(data.get("format") == "monet.schedule", "format", "'monet.schedule'")
        _expect(data.get("version") == FORMAT_VERSION, "version", f"{FORMAT_VERSION}")
        _expect(isinstance(data.get("graph_hash"), str), "graph_hash", "a string")
        kept = data.get("kept")
        _expect(isinstance(kept, list) and all(_is_int(s) for s in kept), "kept", "integers")
        recompute = data.get("recompute")
        _expect(
            isinstance(recompute, list)
            and all(
                isinstance(p, list) and len(p) == 2 and all(_is_int(x) for x in p)
                for p in recompute
            ),
            "recompute",
            "a list of [node, slot] integer pairs",
        )
        _expect(_is_int(data.get("predicted_peak")), "predicted_peak", "an integer")
        overhead = finite_number(data, "predicted_overhead")
        _expect(data.get("status") in STATUSES, "status", f"one of {STATUSES}")
        budget = data.get("budget")
        _expect(budget is None or _is_int(budget), "budget", "null or an integer")
        bound = finite_number(data, "bound", optional=True)
        solve_seconds = finite_number(data, "solve_seconds")
        floor = finite_number(data, "floor", optional=True)
        variants = data.get("variants", [])
        _expect(isinstance(variants, list) and all(_is_int(v) for v in variants), "variants",
                "a list of integers")
        schedule = cls(
            graph_hash=data["graph_hash"],
            budget=budget,
            kept=tuple(kept),
            recompute=tuple((p[0], p[1]) for p in recompute),
            predicted_peak=data["predicted_peak"],
            predicted_overhead=overhead,
            status=data["status"],
            backend=str(data.get("backend", "")),
            bound=bound,
            solve_seconds=solve_seconds,
            meta=data.get("meta", {}) if isinstance(data.get("meta"), dict) else {},
            variants=tuple(variants),
            floor=0.0 if floor is None else floor,
        )
        if problem is not None:
            schedule.check_against(problem)
        return schedule

    def check_against(self, problem: Problem) -> None:
        """Refuse a schedule made for another graph or naming nodes it does not have."""
        if self.graph_hash != problem.graph_hash:
            raise ProblemFileError(
                f"graph_hash: the schedule was made for graph {self.graph_hash}, "
                f"not for this one ({problem.graph_hash})"
            )
        check_variants(problem, self.variants)
        backward = len(problem.indices("backward"))
        for s in self.kept:
            if not 0 <= s < len(problem.storage_bytes):
                raise ProblemFileError(f"kept: storage {s} does not exist")
        for node, slot in self.recompute:
            if not 0 <= node < len(problem.nodes) or problem.nodes[node].phase != "forward":
                raise ProblemFileError(f"recompute: node {node} is not a forward node")
            if not problem.nodes[node].recomputable:
                raise ProblemFileError(f"recompute: node {node} may not be recomputed")
            if not 0 <= slot < backward:
                raise ProblemFileError(f"recompute: slot {slot} is not a backward position")
        # The file's figures must be this schedule's: a hand-edited peak or slot
        # would make every later check lie.
        from monet.simulate import simulate
        from monet.solver.program import ScheduleError, build_program

        try:
            peak = simulate(problem, build_program(problem, self)).peak
        except ScheduleError as error:
            raise ProblemFileError(f"recompute/kept: the schedule cannot run: {error}") from None
        if peak != self.predicted_peak:
            raise ProblemFileError(
                f"predicted_peak: the file says {self.predicted_peak} bytes but this schedule "
                f"peaks at {peak}"
            )

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path, problem: Problem | None = None) -> Schedule:
        return cls.from_json(read_json(path), problem)


def format_bytes(count: float) -> str:
    """Bytes as a short human string: ``1.50 GiB``."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
