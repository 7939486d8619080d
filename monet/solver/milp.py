"""The checkpointing program as a MILP, solved by HiGHS through cvxpy.

The same program as :func:`monet.solver.ilp.solve_cpsat` (same inputs, same
:class:`~monet.solver.ilp.Solution`), for a second opinion and for machines
without OR-tools. It reuses :func:`~monet.solver.ilp.analyse` for the time
axis, the fixed profile and the read structure; read ilp.py's docstring first.

A MILP has no cumulative constraint, so the retention intervals are written
out point by point (a time-indexed formulation). With ``F`` forward steps and
``B`` backward nodes, backward point ``q`` (absolute point ``F + q``) lies in
slot ``q // 2``; the variables are

* ``redo[a]``      binary, op ``a`` is recomputed (only recomputable ops);
* ``slot[a, j]``   binary, one-hot over ``j ≤ upper[a]`` (the first backward
  read of ``a``'s outputs), ``Σ_j slot[a, j] = redo[a]``; the continuous
  prefix sums ``S[a, k] = Σ_{j ≤ k} slot[a, j]`` ("recomputed by slot k")
  keep the rows short;
* ``keep[s]``      binary, decision storage ``s`` is kept;
* ``alive[s, q]``  continuous ≥ 0, a lower bound on "``s`` is live at
  backward point ``q``" (memory only ever pushes it down, so it takes the
  exact 0/1 value wherever it matters). At a forward point ``p`` a decision
  storage is live iff it is kept and ``p > forward_death[s]``.

``end[s]`` of ilp.py is never a variable: only its least value matters,
``max(lower[s], 2·slot[w] for every recomputed reader w and s's own op)``
with ``lower[s] = 2·last_read[s] + 1`` (0 when no backward node reads
``s``). So "live at q" is ``(keep[s] or S[a, q//2]) and (q ≤ lower[s] or
T[w, ⌈q/2⌉] for some such w)``, where ``T[w, k] = redo[w] - S[w, k-1]`` is
"w recomputed at a slot ≥ k"; ``keep[s]`` and ``redo[a]`` exclude each
other, so ``keep[s] + S[a, q//2]`` is their OR, and the AND is linearised as
``alive[s, q] ≥ keep[s] + S[a, q//2] + T[w, ⌈q/2⌉] - 1``, one row per ``w``.
The other constraints mirror ilp.py one to one: a storage a backward node
reads is kept or recomputed no later than its first reader; a recomputation
at slot ``k`` reads only kept storages or ones recomputed at a slot ``≤ k``
(``S[a, k] ≤ keep[s] + S[b, k]`` for every ``k``); a recomputed op's outputs
are not kept; storages no one reads are never kept, and ones only
recomputations read are kept only if one of those runs; non-recomputable ops
are never redone. At every point ``p``:
``fixed[p] + Σ_s bytes[s]·alive[s, p] + Σ_a workspace[a]·slot[a, (p-F)/2] ≤
capacity`` (the budget, or a variable to minimise), plus the
``Structure.optional`` bytes of forward nodes no output needs, through
``run ≥ keep`` columns (a node runs where a kept value it feeds needs it). The
objective is the
same integer one as CP-SAT's (``redo_weights`` per recomputation, a skippable
op's again where a kept value makes the forward run it too; or the capacity), and the MIP gap is closed to below 1, so "optimal" means
the same optimum as CP-SAT's.

Size: O(D·B) continuous variables and rows (``D`` decision storages) and
O(Σ_a upper[a]) binaries, i.e. quadratic in the graph where CP-SAT's interval
model is linear. It is meant for small and medium problems (up to about 300
nodes); use CP-SAT beyond that. Its LP relaxation is strong, though: on
``random_problem(150)`` (275 nodes) it proves optimality in seconds where
CP-SAT is still short of its bound after 30 s.

``hint`` is accepted for signature compatibility and ignored: cvxpy's HiGHS
interface only warm-starts from its own previous solve. ``workers`` is
ignored too (HiGHS's branch and bound is essentially serial). ``log_callback``
receives HiGHS's log lines after the solve, not live.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

import numpy as np

from monet.solver.ilp import (
    TIME_SCALE,
    Hint,
    Solution,
    Structure,
    analyse,
    conditional_readers,
    optional_bytes,
    redo_weights,
    running,
)
from monet.solver.problem import Problem
from monet.solver.program import storage_owner

Expr = dict[int, float]
"""A linear expression over the model's columns: column → coefficient."""


def _sum(*parts: Expr | None) -> Expr:
    result: Expr = {}
    for part in parts:
        for column, coefficient in (part or {}).items():
            result[column] = result.get(column, 0.0) + coefficient
    return result


def _neg(expr: Expr | None) -> Expr | None:
    return None if expr is None else {c: -v for c, v in expr.items()}


class _Model:
    """Columns and rows of a MILP, collected as plain data, then handed to cvxpy at once."""

    def __init__(self) -> None:
        self.columns = 0
        self.boolean: list[int] = []
        self.rows: list[tuple[Expr, float, float]] = []
        """(expression, lower, upper): lower ≤ expression ≤ upper."""

    def column(self, boolean: bool) -> int:
        self.columns += 1
        if boolean:
            self.boolean.append(self.columns - 1)
        return self.columns - 1

    def row(self, terms: Expr, lower: float = -np.inf, upper: float = np.inf) -> None:
        self.rows.append((terms, lower, upper))


def model_profile(
    problem: Problem,
    kept: tuple[int, ...],
    recompute: tuple[tuple[int, int], ...],
    structure: Structure | None = None,
) -> list[int]:
    """Bytes at every point of the program's model (as ilp.py counts them) for a decision.

    Each storage lives to the least ``end`` the constraints allow. The
    largest entry is the capacity the model certifies for the schedule.
    """
    st = analyse(problem) if structure is None else structure
    owner = storage_owner(problem)
    sizes = problem.storage_bytes
    readers = st.readers
    kept_set, slot_of = set(kept), dict(recompute)
    n_forward = len(st.forward)
    profile = list(st.fixed)
    for s in st.decision_storages:
        a = owner[s]
        if s not in kept_set and a not in slot_of:
            continue
        end = 2 * st.last_read[s] + 1 if s in st.last_read else 0
        for w in (a, *readers.get(s, ())):
            if w in slot_of:
                end = max(end, 2 * slot_of[w])
        start = st.forward_death[s] + 1 if s in kept_set else n_forward + 2 * slot_of[a]
        for p in range(start, n_forward + end + 1):
            profile[p] += sizes[s]
    for a, j in slot_of.items():
        profile[n_forward + 2 * j] += st.workspace[a]
    for first, last, amount in optional_bytes(st, kept_set):
        for p in range(first, last + 1):
            profile[p] += amount
    return profile


def solve_milp(
    problem: Problem,
    budget: int | None,
    time_limit: float = 10.0,
    workers: int = 2,
    hint: Hint | None = None,
    log_callback=None,
    stop_at: int | None = None,
) -> Solution:
    """Solve the checkpointing program as a MILP with HiGHS (through cvxpy).

    With ``budget`` None, minimise the peak instead of the time (the smallest
    feasible budget), stopping early once a schedule of peak at most
    ``stop_at`` is found; otherwise minimise recomputation time within
    ``budget``. ``workers`` and ``hint`` are ignored (see the module docstring).
    """
    del workers, hint
    started = time.perf_counter()
    st = analyse(problem)
    if budget is not None and max(st.fixed, default=0) > budget:
        return Solution((), (), "infeasible" if st.exact else "unknown", float("inf"), None,
                        None, time.perf_counter() - started)
    sizes = problem.storage_bytes
    owner = storage_owner(problem)
    readers = st.readers
    n_forward, n_backward = len(st.forward), len(st.backward)
    backward_points = 2 * n_backward
    m = _Model()

    # Recomputations: redo[a], the one-hot slot[a, j] and its prefix sums S[a, k].
    upper: dict[int, int] = {}
    redo: dict[int, int] = {}
    slot: dict[int, list[int]] = {}
    prefix: dict[int, list[int]] = {}
    for a in st.ops:
        reads = [st.first_read[s] for s in st.outputs_of[a] if s in st.first_read]
        upper[a] = min(reads) if reads else max(n_backward - 1, 0)
        if a not in st.recomputable or not backward_points:
            continue  # never redone
        redo[a] = m.column(True)
        slot[a] = [m.column(True) for _ in range(upper[a] + 1)]
        prefix[a] = [m.column(False) for _ in range(upper[a] + 1)]
        for k in range(upper[a] + 1):
            previous = {prefix[a][k - 1]: -1.0} if k else None
            m.row(_sum({prefix[a][k]: 1.0, slot[a][k]: -1.0}, previous), 0.0, 0.0)
        m.row({prefix[a][upper[a]]: 1.0, redo[a]: -1.0}, 0.0, 0.0)

    def done_by(a: int, k: int) -> Expr | None:
        """'a is recomputed at a slot ≤ k' (None: never)."""
        if a not in redo:
            return None
        return {redo[a]: 1.0} if k >= upper[a] else {prefix[a][k]: 1.0}

    def done_from(a: int, k: int) -> Expr | None:
        """'a is recomputed at a slot ≥ k' (None: never)."""
        if a not in redo or k > upper[a]:
            return None
        return {redo[a]: 1.0} if k <= 0 else {redo[a]: 1.0, prefix[a][k - 1]: -1.0}

    # Operator variants: pick[c, k], one per choice.
    pick: dict[tuple[int, int], int] = {}
    for c, count in enumerate(st.alternatives):
        for k in range(count):
            pick[c, k] = m.column(True)
        m.row({pick[c, k]: 1.0 for k in range(count)}, 1.0, 1.0)
    for a, picks in st.no_redo.items():
        if a in redo:
            for c, k in picks:
                m.row({redo[a]: 1.0, pick[c, k]: 1.0}, upper=1.0)
    cond_readers = conditional_readers(st)

    # Keeping: keep[s] only where it may be 1.
    keep: dict[int, int] = {}
    for s in st.decision_storages:
        a = owner[s]
        needed = s in st.first_read
        conditional = cond_readers.get(s, [])
        if not backward_points or not (needed or s in readers or conditional):
            continue  # no reader (or no backward): never kept
        keep[s] = m.column(True)
        if a in redo:  # redo[a] ⇒ no output of a kept
            m.row({keep[s]: 1.0, redo[a]: 1.0}, upper=1.0)
        if needed:  # kept or recomputed (no later than its first reader: upper[a])
            m.row(_sum({keep[s]: 1.0}, done_by(a, upper[a])), lower=1.0)
        else:  # only recomputations or chosen variants read it: kept only if one does
            m.row(_sum({keep[s]: 1.0}, *(_neg(done_by(w, upper[w])) for w in readers.get(s, ())),
                       *({pick[c, k]: -1.0} for c, k, _ in conditional)),
                  upper=0.0)
        for c, k, j in conditional:
            # The chosen variant reads s at backward position j: kept or recomputed by then.
            m.row(_sum({keep[s]: 1.0}, done_by(a, j), {pick[c, k]: -1.0}), lower=0.0)
    # A recomputation at slot ≤ k reads only storages kept or recomputed by slot k.
    for a in redo:
        for s in st.recompute_reads[a]:
            b = owner[s]
            for k in range(upper[a] + 1):
                m.row(
                    _sum(done_by(a, k), _neg({keep[s]: 1.0} if s in keep else None),
                         _neg(done_by(b, k))),
                    upper=0.0,
                )

    # Memory at every point.
    capacity = m.column(False) if budget is None else None

    def memory_row(terms: Expr, point: int) -> None:
        if capacity is not None:
            m.row(_sum(terms, {capacity: -1.0}), upper=-float(st.fixed[point]))
        elif terms:
            m.row(terms, upper=float(budget - st.fixed[point]))

    workspace_at: dict[int, Expr] = {}
    for c, k, point, amount in st.conditional_workspace:
        workspace_at[point] = _sum(workspace_at.get(point), {pick[c, k]: float(amount)})
    for c, k, s, first, last in st.extensions:
        # The picked alternative reads s in the forward until ``last``: z ≥ pick - keep.
        extended = m.column(False)
        m.row(_sum({extended: 1.0, pick[c, k]: -1.0}, {keep[s]: 1.0} if s in keep else None),
              lower=0.0)
        for p in range(first, last + 1):
            workspace_at[p] = _sum(workspace_at.get(p), {extended: float(sizes[s])})
    # Forward nodes that run only for kept values (run ≥ keep of what they feed), and
    # the bytes they hold while they run: z ≥ run - keep[s] (z ≥ run without s).
    run: dict[int, int] = {}
    for i, forcing in st.forced_by.items():
        run[i] = m.column(False)
        for s in forcing:
            if s in keep:
                m.row({run[i]: 1.0, keep[s]: -1.0}, lower=0.0)
    for runners, s, first, last, amount in st.optional:
        active = m.column(False)
        for i in runners:
            m.row(_sum({active: 1.0, run[i]: -1.0}, {keep[s]: 1.0} if s in keep else None),
                  lower=0.0)
        for p in range(first, last + 1):
            workspace_at[p] = _sum(workspace_at.get(p), {active: float(amount)})
    for p in range(n_forward):
        terms = {keep[s]: float(sizes[s]) for s in keep if st.forward_death[s] < p}
        memory_row(_sum(terms, workspace_at.get(p)), p)
    last_needed = {s: 2 * st.last_read[s] + 1 if s in st.last_read else 0
                   for s in st.decision_storages}
    for q in range(backward_points):
        terms: Expr = {}
        for s in st.decision_storages:
            a = owner[s]
            # 'present': kept, or recomputed at a slot ≤ q // 2 (exclusive, so a sum).
            present = _sum({keep[s]: 1.0} if s in keep else None, done_by(a, q // 2))
            if not present:
                continue
            if q <= last_needed[s]:
                bounds = [(present, 0.0)]
            else:  # present and some recomputing reader (or s's own op) runs at q or later
                tails = (done_from(w, (q + 1) // 2) for w in (a, *readers.get(s, ())))
                bounds = [(_sum(present, tail), -1.0) for tail in tails if tail is not None]
                # ... or a chosen variant reads it at q or later.
                bounds += [(_sum(present, {pick[c, k]: 1.0}), -1.0)
                           for c, k, j in cond_readers.get(s, ()) if q <= 2 * j + 1]
            if not bounds:
                continue
            alive = m.column(False)
            for bound, offset in bounds:
                m.row(_sum({alive: 1.0}, _neg(bound)), lower=offset)
            terms[alive] = float(sizes[s])
        if q % 2 == 0:
            for a in redo:
                if st.workspace[a] and q // 2 <= upper[a]:
                    column = slot[a][q // 2]
                    terms[column] = terms.get(column, 0.0) + float(st.workspace[a])
                if a in st.redo_workspace and q // 2 <= upper[a]:
                    # The recomputation's workspace is its variant's: slot ∧ pick.
                    c, amounts = st.redo_workspace[a]
                    for k, amount in enumerate(amounts):
                        if amount:
                            both = m.column(False)
                            m.row({both: 1.0, slot[a][q // 2]: -1.0, pick[c, k]: -1.0}, lower=-1.0)
                            terms[both] = float(amount)
        memory_row(_sum(terms, workspace_at.get(n_forward + q)), n_forward + q)

    weights = redo_weights(st)
    # Variant time: the step's own (pick) and a recomputation's (redo ∧ pick).
    variant_weights: dict[int, float] = {
        pick[ck]: float(round(d * TIME_SCALE)) for ck, d in st.step_delta.items() if d
    }
    for a, deltas in st.redo_delta.items():
        if a not in redo:
            continue
        # A skippable op's second run alone runs the variant's time anew (∧ run).
        factors = [redo[a], *([run[a]] if a in st.skippable else [])]
        for c, k, d in deltas:
            both = m.column(False)
            if d > 0:
                m.row({both: 1.0, pick[c, k]: -1.0, **{f: -1.0 for f in factors}},
                      lower=-float(len(factors)))
            else:
                for f in (*factors, pick[c, k]):
                    m.row({both: 1.0, f: -1.0}, upper=0.0)
            variant_weights[both] = float(round(d * TIME_SCALE))
    # unrun ≥ 1 - run - redo: a skippable op an alternative leaves unread runs not at
    # all, and saves nothing beyond that alternative's step delta.
    unrun: dict[int, int] = {}
    for r in st.skippable:
        column = m.column(False)
        m.row(_sum({column: 1.0, run[r]: 1.0}, {redo[r]: 1.0} if r in redo else None),
              lower=1.0)
        unrun[column] = r
    # A skippable op adds its time when it runs twice: recomputed, and run in the
    # forward because a value kept from it or from its readers needs it (run ≥ keep).
    objective = np.zeros(m.columns)
    if capacity is not None:
        objective[capacity] = 1.0
    else:
        for a, column in redo.items():
            objective[column] = float(weights[a])
        for column, weight in variant_weights.items():
            objective[column] += weight
        for r in st.skippable:
            objective[run[r]] += float(weights[r])
        for column, r in unrun.items():
            objective[column] += float(weights[r])

    result = _run(m, objective, time_limit - (time.perf_counter() - started), budget, stop_at,
                  log_callback)
    seconds = time.perf_counter() - started
    status, values, bound = result
    if not st.exact:  # see Structure.exact: this model's optimum and bound are its own
        status = {"optimal": "feasible", "infeasible": "unknown"}.get(status, status)
        bound = None
    if values is None:
        return Solution((), (), status, float("inf"), None, None, seconds)
    kept = tuple(s for s in st.decision_storages if s in keep and values[keep[s]] > 0.5)
    recompute = tuple(
        (a, int(np.argmax([values[c] for c in slot[a]])))
        for a in st.ops
        if a in redo and values[redo[a]] > 0.5
    )
    variants = tuple(
        int(np.argmax([values[pick[c, k]] for k in range(count)]))
        for c, count in enumerate(st.alternatives)
    )
    # The model's profile for the chosen variants is the plain model of the
    # problem with those variants applied (same storages, same points).
    applied = problem.apply(variants)
    profile = model_profile(applied, kept, recompute, st if not problem.choices else None)
    if budget is None:
        peak = max(profile, default=0)
        return Solution(kept, recompute, status, float(peak),
                        None if bound is None else float(np.ceil(bound - 1e-6)), peak, seconds,
                        variants)
    if max(profile, default=0) > budget:
        # Only a rounding of a numerically loose solution could get here.
        return Solution((), (), "unknown", float("inf"), None, None, seconds)
    cost = sum(weights[a] for a, _ in recompute)
    runs = running(st, kept)
    cost += sum(weights[r] * ((r in runs) - 1) for r in st.skippable)
    cost += sum(round(st.step_delta[c, k] * TIME_SCALE) for c, k in enumerate(variants))
    slots = dict(recompute)
    cost += sum(weights[r] for r in st.skippable if r not in runs and r not in slots)
    for a, deltas in st.redo_delta.items():
        twice = a in slots and (a not in st.skippable or a in runs)
        cost += sum(round(d * TIME_SCALE) for c, k, d in deltas if twice and variants[c] == k)
    # The objective charges a skippable op's run alone; its constant ``- weight`` is here.
    offset = -sum(weights[r] for r in st.skippable)
    return Solution(kept, recompute, status, cost / TIME_SCALE,
                    None if bound is None else (bound + offset) / TIME_SCALE, None, seconds,
                    variants)


def _run(
    m: _Model,
    objective: np.ndarray,
    time_limit: float,
    budget: int | None,
    stop_at: int | None,
    log_callback,
) -> tuple[str, np.ndarray | None, float | None]:
    """Solve ``m`` with HiGHS: (status, column values or None, MIP dual bound or None)."""
    import cvxpy as cp
    from scipy import sparse

    data, row_index, col_index, lower, upper = [], [], [], [], []
    for r, (terms, lo, hi) in enumerate(m.rows):
        for column, coefficient in terms.items():
            if coefficient:
                row_index.append(r)
                col_index.append(column)
                data.append(coefficient)
        lower.append(lo)
        upper.append(hi)
    matrix = sparse.csr_matrix((data, (row_index, col_index)), shape=(len(m.rows), m.columns))
    lower_bounds, upper_bounds = np.array(lower), np.array(upper)
    equal = lower_bounds == upper_bounds
    has_lower = np.isfinite(lower_bounds) & ~equal
    has_upper = np.isfinite(upper_bounds) & ~equal
    # Two cvxpy variables, the binary columns and the continuous ones (all ≥ 0).
    is_boolean = np.zeros(m.columns, dtype=bool)
    is_boolean[m.boolean] = True
    blocks = [
        (index, cp.Variable(index.size, boolean=flag, nonneg=not flag))
        for flag in (True, False)
        if (index := np.flatnonzero(is_boolean == flag)).size
    ]
    matrix = matrix.tocsc()

    def product(rows: np.ndarray):
        return sum(matrix[:, index][rows] @ variable for index, variable in blocks)

    constraints = []
    if equal.any():
        constraints.append(product(equal) == lower_bounds[equal])
    if has_upper.any():
        constraints.append(product(has_upper) <= upper_bounds[has_upper])
    if has_lower.any():
        constraints.append(product(has_lower) >= lower_bounds[has_lower])
    goal = sum(objective[index] @ variable for index, variable in blocks)
    program = cp.Problem(cp.Minimize(goal), constraints)
    options = {
        "time_limit": max(0.1, float(time_limit)),
        # The objective is integral (bytes, or whole microseconds): a gap below 1 proves it.
        "mip_rel_gap": 0.0,
        "mip_abs_gap": 0.5,
    }
    if budget is None and stop_at is not None:
        options["objective_target"] = float(stop_at)
    log_path = None
    if log_callback is not None:
        handle, log_path = tempfile.mkstemp(prefix="monet-highs-", suffix=".log")
        os.close(handle)
        options["log_file"] = log_path
    try:
        with warnings.catch_warnings():
            # cvxpy warns "may be inaccurate" on a time limit; the status says so.
            warnings.filterwarnings("ignore", "Solution may be inaccurate", UserWarning)
            program.solve(solver=cp.HIGHS, verbose=False, **options)
    except cp.SolverError:
        return "unknown", None, None
    finally:
        if log_path is not None:
            with open(log_path, encoding="utf-8", errors="replace") as log:
                for line in log:
                    log_callback(line.rstrip("\n"))
            os.unlink(log_path)
    info = program.solver_stats.extra_stats if program.solver_stats is not None else None
    bound = getattr(info, "mip_dual_bound", None)
    bound = float(bound) if bound is not None and np.isfinite(bound) else None
    if program.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
        return "infeasible", None, None
    if getattr(info, "primal_solution_status", 2) != 2:  # 2: a feasible solution
        return "unknown", None, bound
    values = np.zeros(m.columns)
    for index, variable in blocks:
        if variable.value is None:
            return "unknown", None, bound
        values[index] = variable.value
    status = "optimal" if program.status == cp.OPTIMAL else "feasible"
    return status, values, bound
