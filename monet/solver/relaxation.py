"""The interval relaxation: a strong lower bound, and 0/1 answers to repair into schedules.

The time axis and the fixed profile are :func:`monet.solver.ilp.analyse`'s.
Variables, all in [0, 1] (0/1 with ``integral``):

* ``redo[a]``  op ``a`` is recomputed;
* ``keep[s]``  decision storage ``s`` is kept from the forward;
* ``pick[c, k]`` choice ``c`` runs alternative ``k`` (exactly one per choice);
* ``both[a, c, k]`` = ``redo[a] ∧ pick[c, k]``, where the alternative changes
  what recomputing ``a`` costs.

A storage the backward reads is kept or recomputed, never both
(``keep + redo = 1``; ``≤ 1`` for the rest); a recomputation needs each storage
it reads kept or recomputed (``keep[s'] + redo[b] ≥ redo[a]``); an alternative
that reads ``s`` needs it too (``keep + redo ≥ pick``). Memory, at every point
where keeping everything would not fit: the fixed bytes, the storages live
whatever the schedule (from their first backward reader to their last:
recomputed no later than the first, alive to the last), the kept storages
between their forward death and first reader (or, kept for an alternative's
read, until it: ``keep ∧ pick`` columns), the storages a picked alternative
makes live, and the picked alternatives' workspaces, must fit the budget.
Of the recomputations' own lifetimes it counts what holds wherever they are placed:
a recomputed value an earlier recomputation reads is live from that one's reader
on (or from the reader of that one's outputs, along a chain of recomputations), and
a value kept only to recompute from, or what the chain of recomputations it feeds
makes of it, is live until the chain's output is first read in the backward. A
read "in the backward" is one of the captured ops' or, where every alternative of a
choice reads a value, one of the alternatives'. Every real schedule meets all
of this; what it leaves out (the rest of the recomputations' lifetimes, their
workspace) only adds bytes, so the least
``Σ redo·time + Σ pick·Δtime + Σ both·Δtime`` bounds the added time from
below, and a 0/1 answer is a cheap start that may overshoot the budget by
what was left out (:func:`monet.solver.heuristic.relax_and_repair` closes it).
HiGHS solves it (the LP through ``highspy`` on one model kept between budgets,
the 0/1 program through ``scipy.optimize.milp``) in about a second on the zoo's
graphs, where CP-SAT's own bound of the interval program stays near zero.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import sparse
from scipy.optimize import Bounds, LinearConstraint, milp

from monet.quiet import quiet_fd
from monet.solver.bound import deferrable_bytes
from monet.solver.heuristic import shared_alternative_bytes
from monet.solver.ilp import analyse, runs_in_every_forward
from monet.solver.problem import Problem
from monet.solver.program import storage_owner


@dataclass(frozen=True)
class Relaxed:
    bound: float
    """Seconds every schedule within the budget adds at least (``inf``: none fits)."""
    redo: frozenset[int] | None = None
    """The ops the best 0/1 answer recomputes (None: no 0/1 answer)."""
    variants: tuple[int, ...] | None = None
    """The alternative the best 0/1 answer picks per choice."""
    lean: tuple[int, ...] | None = None
    """Where an LP answer splits a choice between alternatives: per choice, the one of
    them holding the fewest bytes (rounding to the most-picked one can overshoot the
    budget by what the split left out: 55% on ConvNeXt-T's MLPs at 0.5 of keep-all)."""


def relaxation_lower_bound(
    problem: Problem, budget: int, integral: bool = False, time_limit: float = 5.0
) -> float:
    """Seconds of recomputation and variants every schedule within ``budget`` adds at least
    (``inf`` when none fits): the LP (or, with ``integral``, the 0/1 program's proven
    bound within ``time_limit``)."""
    return solve_relaxation(problem, budget, integral, time_limit).bound


def solve_relaxation(
    problem: Problem, budget: int, integral: bool = True, time_limit: float = 5.0
) -> Relaxed:
    """The relaxation of the module docstring, solved by HiGHS within ``time_limit``."""
    return Relaxation(problem).solve(budget, integral, time_limit)


def budget_bound(problem: Problem, time_limit: float = 1.0, tolerance: float = 0.002) -> int:
    """Bytes below which no schedule fits: the least budget the relaxation's LP admits,
    bisected to ``tolerance`` of it within ``time_limit`` (at least
    :func:`monet.solver.bound.budget_lower_bound`, whose knapsack leaves out what the
    LP counts: a storage is live from its first backward reader to its last, whether
    kept or recomputed). Where the program's peaks are not the simulator's
    (``Structure.exact``) the relaxation's infeasibility proves nothing: the knapsack's
    bound is returned."""
    from monet.solver.bound import budget_lower_bound

    deadline = time.perf_counter() + time_limit
    low = budget_lower_bound(problem)
    if not analyse(problem).exact or time_limit <= 0:
        return low
    model = Relaxation(problem)
    high = int((model.level + model.load).max())  # every term fits: admitted
    while high - low > tolerance * high:
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        middle = (low + high) // 2
        if model.solve(middle, integral=False, time_limit=left).bound == math.inf:
            low = middle + 1
        else:
            high = middle  # admitted, or not settled in time: no proof either way
    return low


class BackgroundBound:
    """The relaxation's 0/1 program at one budget, solved by HiGHS in a child process
    while the caller goes on: ``solve``'s heuristics are single-threaded, so on two
    cores the bound costs them little. Its proven bound is the 0/1 program's, above
    the LP's (SAM2 Hiera-T at 0.3 of eager's peak: 626 ms against the LP's 587.7 after
    3 s, where ``solve``'s own 0/1 solves had run out of time). A process, not a
    thread: HiGHS cannot be interrupted before its root node is done and has overrun
    its time limit by seconds on large graphs (a thread would run on into the solves
    after), and building the model in Python would hold the GIL the heuristics need.
    The process is killed when its answer is asked for."""

    def __init__(self, problem: Problem, budget: int, time_limit: float):
        self.deadline = time.perf_counter() + time_limit
        handle, self._path = tempfile.mkstemp(prefix="monet-bound-", suffix=".json")
        os.close(handle)
        problem.save(self._path)
        package = str(Path(__file__).resolve().parent.parent)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD, package, self._path, str(budget),
             repr(time.time() + time_limit)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            text=True)
        self._finalizer = weakref.finalize(self, _stop, self._process, self._path)

    def result(self, wait: float = 0.0) -> float:
        """The proven bound (``-inf``: none, or the solve not done within ``wait``
        seconds; ``inf``: no schedule fits the relaxation). The process is stopped."""
        try:
            # An exited process is read whole (a zero timeout may stop before that).
            out, _ = self._process.communicate(
                timeout=None if self._process.poll() is not None else max(wait, 0.0))
        except subprocess.TimeoutExpired:
            out = ""
        self._finalizer()
        try:  # the last line: HiGHS writes some of its own to standard output
            return float(out.strip().splitlines()[-1])
        except (ValueError, IndexError):
            return -math.inf


_CHILD = (
    "import sys, types\n"
    # The solver imports no torch; the package's __init__ does (1.6 s of the child's
    # start): the package is stood in for by an empty module over its directory.
    "package = types.ModuleType('monet')\n"
    "package.__path__ = [sys.argv[1]]\n"
    "sys.modules['monet'] = package\n"
    "from monet.solver.relaxation import _background_main\n"
    "_background_main(sys.argv[2:])\n"
)


def _stop(process: subprocess.Popen, path: str) -> None:
    if process.poll() is None:
        process.kill()
        process.communicate()
    Path(path).unlink(missing_ok=True)


def _background_main(argv: list[str]) -> None:
    """:class:`BackgroundBound`'s child: the bound on standard output (``-inf`` on any
    failure: the caller then goes without it)."""
    try:
        problem = Problem.load(argv[0])
        budget, deadline = int(argv[1]), float(argv[2])  # the deadline: wall-clock seconds
        model = Relaxation(problem)
        left = deadline - time.time()
        bound = model.solve(budget, integral=True, time_limit=left).bound if left > 0.2 else (
            -math.inf)
    except Exception:  # noqa: BLE001 - any failure only loses the bound
        bound = -math.inf
    print(repr(bound), flush=True)


WHOLE = 1e-6
"""An LP value within this of 0 or 1 counts as whole."""
COST_SCALE = 1e6
"""HiGHS sees the costs in microseconds: in seconds its absolute MIP gap (1e-6) is a
microsecond, and a 0/1 solve stopped within it reported a bound 0.6 µs above the optimum
(0.7333 against 0.7326 ms)."""


def _quiet_highs():
    """A HiGHS instance, its logging off. The first one in a process writes a banner
    to the C-level standard output as it is made: that is sent to the null device."""
    import highspy

    with quiet_fd(1):
        highs = highspy.Highs()
    highs.setOptionValue("output_flag", False)
    return highs


class Relaxation:
    """The relaxation's columns, logic rows and memory terms for one problem, built
    once; :meth:`solve` bounds the memory by a budget (the 0/1 program: a row per binding
    point; the LP: its chain of load columns, :meth:`_runs`) and solves."""

    def __init__(self, problem: Problem, kept_for_variants: bool = True):
        """``kept_for_variants`` False leaves out how long a kept storage lives for a
        variant's read (weaker, and solved faster)."""
        st = analyse(problem)
        sizes = problem.storage_bytes
        owner = storage_owner(problem)
        n_forward, points = len(st.forward), st.points
        self.leanness = shared_alternative_bytes(problem) if problem.choices else []
        self._highs = None  # the LP's HiGHS model, built at the first LP solve
        self.columns = 0
        self.cost: list[float] = []
        self.upper_bound: list[float] = []
        redo = {a: self._column(st.cost[a], 1.0 if a in st.recomputable else 0.0) for a in st.ops}
        keep = {s: self._column(0.0) for s in st.decision_storages}
        pick = {
            (c, k): self._column(st.step_delta.get((c, k), 0.0))
            for c, count in enumerate(st.alternatives)
            for k in range(count)
        }
        self.redo_column, self.pick_column = redo, pick
        self.alternatives = st.alternatives
        self.logic: list[tuple[list[tuple[int, float]], float, float]] = []
        for c, count in enumerate(st.alternatives):
            self.logic.append(([(pick[c, k], 1.0) for k in range(count)], 1.0, 1.0))
        # A skippable op adds its seconds only when it runs twice: recomputed, and run
        # in the forward for a kept value (run ≥ keep): seconds·(redo + run + unrun) less
        # its seconds, unrun ≥ 1 - run - redo covering an alternative that leaves it unread.
        self.offset = 0.0
        run = {}
        for r, seconds in st.skippable.items():
            self.cost[redo[r]] = seconds
            run[r] = self._column(seconds)
            unrun = self._column(seconds)
            self.logic.append(([(unrun, 1.0), (run[r], 1.0), (redo[r], 1.0)], 1.0, math.inf))
            self.offset -= seconds
            for s in st.forced_by[r]:
                self.logic.append(([(run[r], 1.0), (keep[s], -1.0)], 0.0, math.inf))
        for a, deltas in st.redo_delta.items():
            # w = redo ∧ pick (∧ run for a skippable op, whose second run alone runs the
            # variant's time anew), exact either way the sign of ``seconds`` pushes it.
            factors = [redo[a], *([run[a]] if a in st.skippable else [])]
            for c, k, seconds in deltas:
                w = self._column(seconds)
                if seconds >= 0:
                    self.logic.append(([(w, 1.0), *((f, -1.0) for f in factors),
                                        (pick[c, k], -1.0)], -float(len(factors)), math.inf))
                else:
                    for f in (*factors, pick[c, k]):
                        self.logic.append(([(w, 1.0), (f, -1.0)], -math.inf, 0.0))
        for a, picks in st.no_redo.items():
            for c, k in picks:
                self.logic.append(([(redo[a], 1.0), (pick[c, k], 1.0)], -math.inf, 1.0))
        for s in st.decision_storages:
            needed = 1.0 if s in st.first_read else 0.0
            self.logic.append(([(keep[s], 1.0), (redo[owner[s]], 1.0)], needed, 1.0))
        for a in st.ops:
            for s in st.recompute_reads[a]:
                self.logic.append(
                    ([(keep[s], 1.0), (redo[owner[s]], 1.0), (redo[a], -1.0)], 0.0, math.inf)
                )
        by_storage: dict[int, list[tuple[int, int, int]]] = {}
        for (c, k), reads in st.conditional_reads.items():
            for s, j in reads:
                by_storage.setdefault(s, []).append((c, k, j))
        for s, reads in by_storage.items():
            for c, k in {(c, k) for c, k, _ in reads}:
                self.logic.append(
                    ([(keep[s], 1.0), (redo[owner[s]], 1.0), (pick[c, k], -1.0)], 0.0, math.inf)
                )

        # Memory. ``terms`` holds (column, bytes, first point, last point).
        live = runs_in_every_forward(problem, st.forward)
        constant = np.zeros(points + 1, dtype=np.int64)  # changes, summed below
        terms: list[tuple[int, int, int, int]] = []

        def always(start: int, stop: int, amount: int) -> None:
            constant[start] += amount
            constant[stop + 1] -= amount

        # Storage → (choice, alternative) → the first backward position it reads it.
        first_reads: dict[int, dict[tuple[int, int], int]] = {}
        for s, reads in by_storage.items():
            firsts = first_reads.setdefault(s, {})
            for c, k, j in reads:
                firsts[c, k] = min(firsts.get((c, k), j), j)
        spans: dict[int, tuple[int, int] | None] = {}
        kept_to: dict[int, int] = {}
        """Decision storage → last point its ``keep`` term counts it."""
        for s in st.decision_storages:
            start = st.forward_death[s] + 1
            if s in st.first_read:
                first = n_forward + 2 * st.first_read[s]
                last = n_forward + 2 * st.last_read[s] + 1
                always(first, last, sizes[s])
                spans[s] = (first, last)
                until = first - 1
            else:
                spans[s] = None
                # Kept for a recomputation: live at least into the backward's
                # start. Kept for nothing but variants' reads: at least until the
                # earliest of them. Read by every alternative of a choice (a
                # convolution's input, whichever kernel runs): at least until the
                # earliest of those, whatever else reads it.
                # (No backward, no recomputation: nothing is kept.)
                until = n_forward if s in st.readers and st.backward else -1
                firsts = first_reads.get(s, {})
                if firsts and s not in st.readers:
                    until = n_forward + 2 * min(firsts.values()) - 1
                for c in {c for c, _ in firsts}:
                    of_c = [j for (cc, _), j in firsts.items() if cc == c]
                    if len(of_c) == st.alternatives[c]:
                        until = max(until, n_forward + 2 * min(of_c) - 1)
            if start <= until:
                terms.append((keep[s], sizes[s], start, until))
                kept_to[s] = until
            firsts = first_reads.get(s, {})
            if kept_for_variants and spans[s] is None and len({c for c, _ in firsts}) == 1:
                # Kept and read by the picked alternative (an MLP's hidden value for
                # its captured backward): live until that read. One column per
                # alternative, z ≥ keep + pick - 1.
                for (c, k), j in sorted(firsts.items()):
                    lo, hi = max(start, until + 1), n_forward + 2 * j - 1
                    if lo <= hi:
                        z = self._column(0.0)
                        self.logic.append(([(z, 1.0), (keep[s], -1.0), (pick[c, k], -1.0)],
                                           -1.0, math.inf))
                        terms.append((z, sizes[s], lo, hi))
        self._earliest, self._latest = self._certain_reads(st, by_storage)
        self._chain_until: dict[int, int] = {}
        self._paths: dict[int, list[tuple[tuple[int, ...], int]]] = {}
        self._add_kept_for_recomputations(st, sizes, by_storage, keep, redo, pick, terms)
        self._add_early_recomputations(st, owner, sizes, by_storage, redo, pick, terms)
        # What a picked alternative makes live whatever else the schedule does:
        # from the earlier of its first read and the captured first read, to the
        # later of the last reads. Only for storages one choice alone reads, so
        # that two picks never count one storage twice.
        choices_of = {s: {c for c, _, _ in reads} for s, reads in by_storage.items()}
        for s, reads in by_storage.items():
            if len(choices_of[s]) != 1:
                continue
            excluded = spans[s]
            kept_until = kept_to.get(s)
            for c, k in {(c, k) for c, k, _ in reads}:
                positions = [j for cc, kk, j in reads if (cc, kk) == (c, k)]
                first = n_forward + 2 * min(positions)
                last = n_forward + 2 * max(positions) + 1
                if excluded is not None:
                    first, last = min(first, excluded[0]), max(last, excluded[1])
                pieces = [(first, last)]
                if excluded is not None:
                    pieces = [(first, excluded[0] - 1), (excluded[1] + 1, last)]
                for lo, hi in pieces:
                    if kept_until is not None:
                        lo = max(lo, kept_until + 1)  # keep[s] counts those points already
                    if lo <= hi:
                        terms.append((pick[c, k], sizes[s], lo, hi))
        for c, k, point, amount in st.conditional_workspace:
            if point >= n_forward or st.forward[point] in live:
                terms.append((pick[c, k], amount, point, point))
        for c, k, s, first, last in st.extensions:
            if st.forward[last] not in live:
                continue  # a reader no output needs may be skipped, its read with it
            z = self._column(0.0)  # z ≥ pick - keep: read that late, and not kept
            self.logic.append(([(z, 1.0), (pick[c, k], -1.0), (keep[s], 1.0)], 0.0, math.inf))
            terms.append((z, sizes[s], first, last))
        self.level = np.asarray(st.fixed, dtype=np.int64) + np.cumsum(constant)[:points]
        self.level -= deferrable_bytes(problem, st, live)
        load = np.zeros(points + 1, dtype=np.int64)
        for _, amount, lo, hi in terms:
            load[lo] += amount
            load[hi + 1] -= amount
        self.load = np.cumsum(load)[:points]
        self.terms = terms

    @staticmethod
    def _certain_reads(st, by_storage) -> tuple[dict[int, int], dict[int, int]]:
        """The storages every schedule reads in the backward (the captured ops read them,
        or every alternative of one choice does: a norm's output that an MLP reads
        whichever way it runs), each with the earliest position any schedule may first
        read it, and the latest (every schedule reads it by then)."""
        earliest: dict[int, int] = {}
        latest: dict[int, int] = dict(st.first_read)
        for o, reads in by_storage.items():
            for c in {c for c, _, _ in reads}:
                firsts: dict[int, int] = {}
                for cc, k, j in reads:
                    if cc == c:
                        firsts[k] = min(firsts.get(k, j), j)
                if len(firsts) == st.alternatives[c]:
                    latest[o] = min(latest.get(o, math.inf), max(firsts.values()))
        for o in latest:
            earliest[o] = min([st.first_read.get(o, math.inf),
                               *(j for _, _, j in by_storage.get(o, ()))])
        return earliest, latest

    def _add_early_recomputations(self, st, owner, sizes, by_storage, redo, pick, terms
                                  ) -> None:
        """A recomputed storage that a recomputation reads lives from that recomputation
        on, not only from its own first backward reader: recomputing op ``a`` happens no
        later than the first backward read of its outputs (``J(a)``), and every value it
        reads is live then. So a storage ``s`` that is recomputed (``redo[b]``, ``b`` its
        op), read by the recomputation of ``a``, and first read in the backward after
        ``J(a)`` is live over ``[J(a), first read of s)``, which the always-live term
        leaves out. Where the chain is recomputed just in time (a layer's
        norm → linear → activation) those are the bytes of its intermediates while the
        chain's last value is read; leaving them out made the relaxation's answers
        overshoot the budget by 5–10% on the zoo's transformers. Readers are taken in
        order of ``J``: piece ``k`` of ``s``'s span is live if ``b`` and any reader with
        ``J ≤ J_k`` are recomputed (``u_k ≥ redo[b] + redo[a] - 1``), so no point counts
        ``s`` twice.

        A storage that only some alternatives of one choice read in the backward (a
        residual stream that a norm reads unless it reads its own output) gets the same
        terms up to each alternative's first read, where it is picked (``+ pick - 2``;
        its own terms count it from that read on), and not where a term of
        :meth:`_add_kept_for_recomputations` may count ``b``'s outputs along a chain.
        Left out, ConvNeXt-T's answer at 0.5 of keep-everything's peak held 37 MiB
        the relaxation did not count: its blocks' outputs, recomputed to rebuild
        the next block and held for their norms' backward."""
        for s in st.decision_storages:
            b = owner[s]
            if b not in st.recomputable:
                continue
            if s in self._earliest:
                self._early_pieces(st, sizes, redo, terms, s, b, self._earliest[s], None, -1)
                continue
            reads = by_storage.get(s, ())
            if len({c for c, _, _ in reads}) != 1:
                continue
            firsts: dict[tuple[int, int], int] = {}
            for c, k, j in reads:
                firsts[c, k] = min(firsts.get((c, k), j), j)
            for ck, first in sorted(firsts.items()):
                self._early_pieces(st, sizes, redo, terms, s, b, first, pick[ck],
                                   self._chain_until.get(b, -1))

    def _early_pieces(self, st, sizes, redo, terms, s: int, b: int, first: int,
                      picked: int | None, after: int) -> None:
        """:meth:`_add_early_recomputations`'s terms for ``s`` up to ``first``, from
        ``after`` on, under ``picked`` (a pick column) if given."""
        n_forward = len(st.forward)
        due: dict[int, list[tuple[int, ...]]] = {}
        for a in st.readers.get(s, ()):
            for path, j in self._due_paths(st, a):
                if j < first:
                    due.setdefault(max(j, after), []).append(path)
        marks = sorted(due)
        extra = [] if picked is None else [(picked, -1.0)]
        # Piece k holds if any path due by its start runs: u_k ≥ u_(k-1), and u_k ≥ each
        # path due at its start (a row per path, not one per piece and path: on the random
        # 3,000-node graph 56k rows against 100k, its LP 1.6 s against 2.2).
        pending: list[tuple[int, ...]] = []
        before = None
        for k, j in enumerate(marks):
            pending += due[j]
            stop = marks[k + 1] if k + 1 < len(marks) else first
            if j >= stop:
                continue
            u = self._column(0.0)
            if before is not None:
                self.logic.append(([(u, 1.0), (before, -1.0)], 0.0, math.inf))
            for path in pending:
                self.logic.append(([(u, 1.0), (redo[b], -1.0), *((redo[a], -1.0) for a in path),
                                    *extra], -float(len(path) + len(extra)), math.inf))
            pending, before = [], u
            terms.append((u, sizes[s], n_forward + 2 * j, n_forward + 2 * stop - 1))

    def _due_paths(self, st, a: int, longest: int = 4) -> list[tuple[tuple[int, ...], int]]:
        """Where ``a``'s recomputation is due: ``((a,), J(a))`` if every schedule reads one
        of its outputs in the backward, and ``((a, r, …), J(…))`` through the
        recomputations that read its outputs (recomputed, ``r`` needs ``a``'s outputs
        first): a residual add whose output only the next block's recomputation reads."""
        if a in self._paths:
            return self._paths[a]
        found: list[tuple[tuple[int, ...], int]] = []

        def walk(path: tuple[int, ...]) -> None:
            z = path[-1]
            j = self._due(st, z)
            if j is not None:
                found.append((path, j))
            if len(path) < longest:
                for o in st.outputs_of[z]:
                    for r in st.readers.get(o, ()):
                        if r not in path:
                            walk((*path, r))

        walk((a,))
        # Of the paths due at one point, the shortest is the weakest condition.
        best: dict[int, tuple[int, ...]] = {}
        for path, j in found:
            if j not in best or len(path) < len(best[j]):
                best[j] = path
        self._paths[a] = sorted(((p, j) for j, p in best.items()), key=lambda f: f[1])
        return self._paths[a]

    def _earliest_due(self, st, a: int) -> int | None:
        """The earliest point any of ``a``'s due paths puts its recomputation."""
        paths = self._due_paths(st, a)
        return paths[0][1] if paths else None

    def _add_kept_for_recomputations(self, st, sizes, by_storage, keep, redo, pick, terms
                                     ) -> None:
        """A storage kept only for recomputations (no backward node reads it) is counted
        into the backward's first point only, as its readers may all be recomputed there.
        Wherever they are, at every backward point before ``J(a)`` (the first backward
        read of ``a``'s outputs, no earlier than ``a``'s recomputation) either ``s`` is
        still live (``a`` not yet recomputed) or ``a``'s outputs are (recomputed, not yet
        read). So with ``s`` kept and any reader ``a`` whose ``J(a)`` lies past a point
        recomputed, at least ``min(|s|, |outputs of a|)`` of those bytes are live there;
        the readers whose ``J`` lies past a piece of the span share one column over it
        (``u ≥ keep[s] + redo[a] - 1``), with the least such ``min``, so no point counts
        ``s`` twice. ``a``'s outputs must be counted by nothing else there: a reader
        of several such storages gives each a share of its outputs' bytes, and past the
        due point of a recomputation reading
        an output (where :meth:`_add_early_recomputations` may count it) the term holds
        only if that recomputation does not run.

        A storage only one choice's alternatives read in the backward (a convolution's
        output that the norm after it reads unless it reads its own output instead) is
        counted the same way where no alternative reading it is picked (``u ≥ keep[s] +
        redo[a] - 1 - Σ pick``): where one is, the picked alternative's terms count
        ``s`` until its read. Left out, a ConvNeXt-T answer at 0.5 of keep-everything's
        peak kept 108 MiB the relaxation did not count (its norms read their outputs,
        their inputs kept to recompute them), 18% over the budget.
        ``J(a)`` is then the earliest read of an output that every schedule reads (by the
        captured ops, or by every alternative of a choice: a norm's output that an MLP
        reads whichever way it runs), an alternative's read included."""
        n_forward = len(st.forward)
        extended = {s for _, _, s, _, _ in st.extensions}
        readers_of = {s: {(c, k) for c, k, _ in reads} for s, reads in by_storage.items()}
        alone = {s for s in st.decision_storages
                 if s not in st.first_read and s not in extended
                 and len({c for c, _ in readers_of.get(s, ())}) <= 1}
        certain = self._earliest
        chains = {s: list(self._chains(st, sizes, by_storage, certain, s)) for s in alone}
        # Op → the latest ``J`` of a chain whose terms may count its outputs.
        for found in chains.values():
            for chain, j, _ in found:
                for a in chain[:-1]:
                    self._chain_until[a] = max(self._chain_until.get(a, -1), j)
        # Op → the kept storages whose chains pass it: its bytes are shared between
        # their terms, by size, so that no point counts them twice.
        reach: dict[int, set[int]] = {}
        for s, found in chains.items():
            for chain, _, _ in found:
                for a in chain:
                    reach.setdefault(a, set()).add(s)
        for s in sorted(alone):
            # Chain → (J, the least bytes live along it or |s|, the recomputations
            # reading its last op's outputs due before J, with their due points).
            readers: dict[tuple[int, ...], tuple[int, int, list[tuple[int, int]]]] = {}
            for chain, j, held in chains[s]:
                amount = sizes[s]
                for a, bytes_ in zip(chain, held):
                    amount = min(amount, bytes_ * sizes[s] // max(
                        1, sum(sizes[t] for t in reach[a])))
                z = chain[-1]
                early = [(r, self._earliest_due(st, r)) for o in st.outputs_of[z] if o in certain
                         for r in st.readers.get(o, ())]
                readers[chain] = (j, amount,
                                  [(r, d) for r, d in early if d is not None and d < j])
            marks = sorted({j for j, _, _ in readers.values()}
                           | {d for _, _, early in readers.values() for _, d in early},
                           reverse=True)
            for k, mark in enumerate(marks):
                below = marks[k + 1] if k + 1 < len(marks) else None
                lo = n_forward + 2 * below if below is not None else n_forward + 1
                hi = n_forward + 2 * mark - 1
                eligible = [c for c, (j, amount, _) in readers.items() if j >= mark and amount]
                if not eligible or lo > hi:
                    continue
                # The most bytes any recomputed chain holds, in layers: column i counts
                # the step from the (i-1)-th least amount to the i-th, and is 1 when a
                # chain holding at least the i-th runs.
                below_amount = 0
                for amount in sorted({readers[c][1] for c in eligible}):
                    u = self._column(0.0)
                    for chain in eligible:
                        if readers[chain][1] < amount:
                            continue
                        # Where a recomputation reading the chain's last outputs is due,
                        # the early term may count them: this one holds only if none runs.
                        counted = [r for r, d in readers[chain][2]
                                   if below is not None and d <= below]
                        self.logic.append(([(u, 1.0), (keep[s], -1.0)]
                                           + [(redo[a], -1.0) for a in chain]
                                           + [(redo[r], 1.0) for r in counted]
                                           + [(pick[ck], 1.0) for ck in readers_of.get(s, ())],
                                           -float(len(chain)), math.inf))
                    terms.append((u, amount - below_amount, lo, hi))
                    below_amount = amount

    @staticmethod
    def _chains(st, sizes, by_storage, certain, s: int, longest: int = 4):
        """The recomputation chains from kept storage ``s``: ops ``a, b, …, z``, each
        reading the one before's outputs (``a`` reads ``s``), ``z``'s outputs read by
        every schedule; with ``J`` (the earliest such read, or any alternative's read of
        an output along the way: its terms count that output from there) and, per op,
        the bytes of its outputs surely live until the next runs (the least a next
        op of it reads; ``z``: those every schedule reads)."""
        def least_read(a: int) -> int:
            return min((sum(sizes[o] for o in st.outputs_of[a] if o in st.recompute_reads[b])
                        for o in st.outputs_of[a] if o not in certain
                        for b in st.readers.get(o, ())), default=0)

        def walk(chain: tuple[int, ...], limit: float):
            z = chain[-1]
            read = [o for o in st.outputs_of[z] if o in certain]
            if read:
                j = min(limit, min(certain[o] for o in read))
                yield chain, int(j), [least_read(a) for a in chain[:-1]] + [
                    sum(sizes[o] for o in read)]
                return
            if len(chain) >= longest:
                return
            for o in st.outputs_of[z]:
                early = min((at for _, _, at in by_storage.get(o, ())), default=math.inf)
                for b in st.readers.get(o, ()):
                    if b not in chain:
                        yield from walk((*chain, b), min(limit, early))

        seen = set()
        for a in st.readers.get(s, ()):
            for found in walk((a,), math.inf):
                if found[0] not in seen:
                    seen.add(found[0])
                    yield found

    def _due(self, st, a: int) -> int | None:
        """The latest first backward read of ``a``'s outputs (``a`` is recomputed no
        later)."""
        reads = [self._latest[o] for o in st.outputs_of[a] if o in self._latest]
        return min(reads) if reads else None

    def _term_arrays(self):
        """``terms`` as arrays: column, bytes (float), first point, last point."""
        if getattr(self, "_terms", None) is None:
            table = np.asarray(self.terms, dtype=np.int64).reshape(-1, 4)
            self._terms = (table[:, 0], table[:, 1].astype(float), table[:, 2], table[:, 3])
        return self._terms

    def _logic_rows(self) -> LinearConstraint:
        """The logic rows, built once."""
        if getattr(self, "_logic", None) is None:
            rows = [r for r, (entries, _, _) in enumerate(self.logic) for _ in entries]
            cols = [column for entries, _, _ in self.logic for column, _ in entries]
            values = [value for entries, _, _ in self.logic for _, value in entries]
            logic = sparse.csr_matrix((values, (rows, cols)),
                                      shape=(len(self.logic), self.columns))
            self._logic = LinearConstraint(
                logic, [low for _, low, _ in self.logic], [high for _, _, high in self.logic])
        return self._logic

    def _column(self, cost: float, upper: float = 1.0) -> int:
        self.cost.append(cost)
        self.upper_bound.append(upper)
        self.columns += 1
        return self.columns - 1

    def _binding(self, room: np.ndarray) -> np.ndarray:
        """The points whose memory row can bind with ``room`` bytes free at each: where
        every term at once would not fit, and of each run of points no term starts or
        ends between (covered by the same terms: :meth:`_runs`), only the one with the
        least room."""
        binding = np.flatnonzero(self.load > room)
        if not len(binding):
            return binding
        _, starts, _ = self._runs()
        run = np.searchsorted(starts, binding, "right")
        order = np.lexsort((room[binding], run))
        binding = binding[order][np.r_[True, run[order][1:] != run[order][:-1]]]
        binding.sort()
        return binding

    def _memory(self, points: np.ndarray) -> sparse.csr_matrix:
        """The memory rows of ``points`` (sorted): each term's bytes on its column, in
        the rows of the points within [first, last]."""
        column, amount, lo, hi = self._term_arrays()
        first = np.searchsorted(points, lo)
        count = np.maximum(np.searchsorted(points, hi, "right") - first, 0)
        starts = np.repeat(first - np.cumsum(count) + count, count)
        rows = np.arange(int(count.sum())) + starts
        return sparse.csr_matrix(
            (np.repeat(amount, count), (rows, np.repeat(column, count))),
            shape=(len(points), self.columns))

    def _runs(self):
        """The memory as a chain: the points split into runs no term starts or ends
        within (the same terms cover all of a run), one load column per run, and one
        row per run: its load is the last run's, plus what starts there, less what
        ended before it. Each term is in two rows, where a row per point held every
        term covering it: 1.2 million nonzeros on the random 3,000-node graph, 310,000
        on MViTv2-T, against 2 per term; the random graph's LP is solved in 0.7 s
        against 2.6. A budget is then the load columns' upper bounds (the least room in
        each run). Returns the rows (equal to 0; over the columns and then the loads),
        each run's first point and its load with every term at 1. The LP's form: for
        the 0/1 program HiGHS's branch and bound gained nothing from it and overran its
        time limit (63 s for 20 on the random 3,000-node graph, 24 with a row per point)."""
        if getattr(self, "_chain", None) is None:
            column, amount, lo, hi = self._term_arrays()
            points = len(self.level)
            starts = np.unique(np.concatenate([[0], lo, hi + 1]))
            starts = starts[starts < points]
            runs = len(starts)
            began = np.searchsorted(starts, lo)
            ended = np.searchsorted(starts, hi + 1)  # the run after the term's last
            after = ended < runs
            rows = np.concatenate([began, ended[after], np.arange(runs), np.arange(1, runs)])
            cols = np.concatenate([column, column[after], self.columns + np.arange(runs),
                                   self.columns + np.arange(runs - 1)])
            values = np.concatenate([-amount, amount[after], np.ones(runs),
                                     -np.ones(runs - 1)])
            chain = sparse.csr_matrix((values, (rows, cols)),
                                      shape=(runs, self.columns + runs))
            self._chain = chain, starts, self.load[starts]
        return self._chain

    def _load_limits(self, room: np.ndarray) -> np.ndarray:
        """Each run's load column's upper bound within ``room``: the least room at its
        points, where every term at once would not fit (elsewhere none)."""
        _, starts, load = self._runs()
        least = np.minimum.reduceat(room, starts).astype(float)
        return np.where(load > least, least, np.inf)

    def solve(self, budget: int, integral: bool = True, time_limit: float = 5.0,
              variants: tuple[int, ...] | None = None) -> Relaxed:
        """The relaxation within ``budget``, solved by HiGHS within ``time_limit``; with
        ``variants``, each choice held to that alternative."""
        room = budget - self.level
        if (room < 0).any():
            return Relaxed(math.inf)
        if not integral:
            return self._solve_lp(room, time_limit, variants)
        binding = self._binding(room)
        constraints = []
        if len(binding):
            constraints.append(LinearConstraint(self._memory(binding), -np.inf,
                                                room[binding].astype(float)))
        if self.logic:
            constraints.append(self._logic_rows())
        lower, upper = self._bounds(variants)
        result = milp(
            np.asarray(self.cost) * COST_SCALE, constraints=constraints,
            integrality=np.ones(self.columns), bounds=Bounds(lower, upper),
            options={"time_limit": max(0.1, time_limit), "disp": False},
        )
        if result.status == 2:  # proven infeasible
            return Relaxed(math.inf)
        dual = getattr(result, "mip_dual_bound", None)
        bound = float(dual) / COST_SCALE + self.offset if dual is not None and math.isfinite(
            dual) else -math.inf
        if result.x is None:
            return Relaxed(bound)
        return Relaxed(bound, *self._answer(result.x))

    def _bounds(self, variants: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
        """Column bounds; with ``variants``, each choice's pick columns fixed to them."""
        lower, upper = np.zeros(self.columns), np.array(self.upper_bound, dtype=float)
        if variants is not None:
            for (c, k), column in self.pick_column.items():
                lower[column] = upper[column] = float(variants[c] == k)
        return lower, upper

    def _solve_lp(self, room: np.ndarray, time_limit: float,
                  variants: tuple[int, ...] | None) -> Relaxed:
        """The LP on one HiGHS model kept between calls, a budget being the load
        columns' bounds. Solved afresh each time: from the last basis, the dual simplex
        took longer (random 3,000-node graph, the budget lowered 5% at a time: 0.8-3.2 s
        a solve against 0.7-1.4 s afresh; the zoo's LPs take 0.1 s either way)."""
        import highspy

        chain, starts, _ = self._runs()
        runs = len(starts)
        if self._highs is None:
            highs = _quiet_highs()
            lower, upper = self._bounds(None)
            highs.addVars(self.columns + runs, np.concatenate([lower, np.full(runs, -np.inf)]),
                          np.concatenate([upper, np.full(runs, np.inf)]))
            highs.changeColsCost(self.columns, np.arange(self.columns, dtype=np.int32),
                                 np.asarray(self.cost) * COST_SCALE)
            if self.logic:
                logic = self._logic_rows()
                self._add_rows(highs, logic.A, logic.lb, logic.ub)
            self._add_rows(highs, chain, np.zeros(runs), np.zeros(runs))
            self._highs = highs
        highs = self._highs
        lower, upper = self._bounds(variants)
        lower = np.concatenate([lower, np.full(runs, -np.inf)])
        upper = np.concatenate([upper, self._load_limits(room)])
        highs.changeColsBounds(self.columns + runs,
                               np.arange(self.columns + runs, dtype=np.int32), lower, upper)
        # HiGHS's time limit counts the instance's run time over all its solves.
        highs.setOptionValue("time_limit", highs.getRunTime() + max(0.1, time_limit))
        highs.clearSolver()
        highs.run()
        status = highs.getModelStatus()
        if status == highspy.HighsModelStatus.kInfeasible:
            return Relaxed(math.inf)
        if status != highspy.HighsModelStatus.kOptimal:
            return Relaxed(-math.inf)
        x = np.asarray(highs.getSolution().col_value)
        return Relaxed(highs.getInfo().objective_function_value / COST_SCALE + self.offset,
                       *self._answer(x))

    @staticmethod
    def _add_rows(highs, matrix: sparse.csr_matrix, lower, upper) -> None:
        matrix = sparse.csr_matrix(matrix)
        highs.addRows(matrix.shape[0], np.asarray(lower, dtype=float),
                      np.asarray(upper, dtype=float), matrix.nnz,
                      matrix.indptr[:-1].astype(np.int32), matrix.indices.astype(np.int32),
                      matrix.data.astype(float))

    def _answer(self, x) -> tuple[frozenset[int], tuple[int, ...], tuple[int, ...] | None]:
        """The 0/1 answer nearest ``x``: what is recomputed more than half, and the
        alternative picked most (an LP's answer, rounded); and where a choice's pick is
        split, the leanest alternative it picks at all, per choice."""
        redo = frozenset(a for a, column in self.redo_column.items() if x[column] > 0.5)
        variants = tuple(
            max(range(count), key=lambda k: x[self.pick_column[c, k]])
            for c, count in enumerate(self.alternatives)
        )
        whole = all(x[self.pick_column[c, k]] > 1 - WHOLE for c, k in enumerate(variants))
        return redo, variants, None if whole else self.lean_variants(x)

    def lean_variants(self, x) -> tuple[int, ...]:
        """Per choice, of the alternatives ``x`` picks at all, the one holding the fewest
        bytes in the backward (:func:`monet.solver.heuristic.alternative_bytes`)."""
        return tuple(
            min((k for k in range(count) if x[self.pick_column[c, k]] > WHOLE),
                key=lambda k: (self.leanness[c][k], -x[self.pick_column[c, k]]))
            for c, count in enumerate(self.alternatives)
        )
