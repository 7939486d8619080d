"""The interval model's peak of one schedule, in numpy: a fast filter for the heuristics.

The heuristics try many small moves (recompute one op more, keep one more
value) and simulating each costs tens of milliseconds on the zoo's graphs.
The model of :mod:`monet.solver.ilp` gives each storage one interval of the
time axis; summing the intervals of one schedule takes about a millisecond.
Its peak is never below the simulated one (it counts every recomputation of a
slot as made when the first runs), and equals it on most schedules, so the
heuristics rank their moves with it and simulate only the best.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from monet.solver.ilp import Structure
from monet.solver.problem import Problem


class PeakModel:
    """Model peaks of schedules of one problem with no choices left."""

    def __init__(self, problem: Problem, structure: Structure):
        if problem.choices:
            raise ValueError("apply the variants first: the model peak is per variant vector")
        self.structure = structure
        self.base = np.asarray(structure.fixed, dtype=np.int64)
        self.forward = len(structure.forward)
        self.points = structure.points
        count = len(problem.storage_bytes)
        self.sizes = np.asarray(problem.storage_bytes, dtype=np.int64)
        # Per decision storage: where keeping it starts, and the end its backward
        # readers alone give (2·last reader + 1, or 0).
        self.kept_start = np.zeros(count, dtype=np.int64)
        self.end = np.zeros(count, dtype=np.int64)
        for s in structure.decision_storages:
            self.kept_start[s] = structure.forward_death[s] + 1
            if s in structure.last_read:
                self.end[s] = 2 * structure.last_read[s] + 1
        empty = np.zeros(0, dtype=np.int64)
        self.reads = {a: np.asarray(structure.recompute_reads[a], dtype=np.int64) if
                      structure.recompute_reads[a] else empty for a in structure.ops}
        self.outputs = {a: np.asarray(structure.outputs_of[a], dtype=np.int64)
                        for a in structure.ops}
        # The optional terms (``Structure.optional``): which nodes the kept storages
        # make the forward run, and which terms those runs switch on.
        runners = list(structure.forced_by)
        index = {i: r for r, i in enumerate(runners)}
        self.forcing = sparse.csr_matrix(
            (np.ones(sum(map(len, structure.forced_by.values()))),
             ([index[i] for i in runners for _ in structure.forced_by[i]],
              [s for i in runners for s in structure.forced_by[i]])),
            shape=(len(runners), count))
        optional = structure.optional
        self.switched = sparse.csr_matrix(
            (np.ones(sum(len(o[0]) for o in optional)),
             ([t for t, o in enumerate(optional) for _ in o[0]],
              [index[i] for o in optional for i in o[0]])),
            shape=(len(optional), len(runners)))
        self.optional_storage = np.asarray([o[1] for o in optional], dtype=np.int64)
        self.optional_span = (np.asarray([o[2] for o in optional], dtype=np.int64),
                              np.asarray([o[3] for o in optional], dtype=np.int64),
                              np.asarray([o[4] for o in optional], dtype=np.float64))

    def first_point(self, s: int) -> int:
        """The point of the first backward node that reads storage ``s`` (past the axis:
        none does)."""
        first = self.structure.first_read.get(s)
        return self.points if first is None else self.forward + 2 * first + 1

    def intervals(self, kept, recompute) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first point, last point, storage) of each storage ``kept`` and ``recompute``
        ((op, slot) pairs, as in a ``Schedule``) add to the fixed bytes."""
        n_forward = self.forward
        kept = np.fromiter(kept, dtype=np.int64)
        end = self.end.copy()
        if recompute:
            ops = [a for a, _ in recompute]
            slots = np.fromiter((j for _, j in recompute), dtype=np.int64, count=len(ops))
            reads = [self.reads[a] for a in ops]
            outputs = [self.outputs[a] for a in ops]
            # A storage a recomputation reads lives until that recomputation's slot.
            read = np.concatenate(reads)
            np.maximum.at(end, read, 2 * np.repeat(slots, [len(r) for r in reads]))
            made = np.concatenate(outputs)
            made_slot = 2 * np.repeat(slots, [len(o) for o in outputs])
            starts = np.concatenate([self.kept_start[kept], n_forward + made_slot])
            stops = n_forward + np.concatenate([end[kept], np.maximum(end[made], made_slot)])
            storages = np.concatenate([kept, made])
        else:
            starts, stops, storages = self.kept_start[kept], n_forward + end[kept], kept
        return starts, stops, storages

    def profile(self, kept, recompute) -> np.ndarray:
        """Bytes the model counts at each point of the time axis for ``kept`` storages
        and ``recompute`` ((op, slot) pairs, as in a ``Schedule``)."""
        return self._sum(self.intervals(kept, recompute), recompute, kept)

    def _sum(self, intervals, recompute, kept) -> np.ndarray:
        starts, stops, storages = intervals
        amounts = self.sizes[storages]
        # Byte counts stay far below 2**53, so float weights add them exactly.
        delta = (np.bincount(starts, amounts, self.points + 1)
                 - np.bincount(stops + 1, amounts, self.points + 1))
        if len(self.optional_storage):
            mask = np.zeros(len(self.sizes) + 1)  # the last entry stands for "no storage"
            mask[np.fromiter(kept, dtype=np.int64)] = 1.0
            runs = (self.forcing @ mask[:-1]) > 0
            on = ((self.switched @ runs) > 0) & (mask[self.optional_storage] == 0)
            first, last, amount = self.optional_span
            delta += (np.bincount(first[on], amount[on], self.points + 1)
                      - np.bincount(last[on] + 1, amount[on], self.points + 1))
        profile = self.base + np.cumsum(delta[:-1]).astype(np.int64)
        # The recomputations of one slot run one after another: at most the largest
        # workspace is live at once (the CP-SAT model sums them).
        workspace = self.structure.workspace
        spent = [(self.forward + 2 * j, workspace[a]) for a, j in recompute if workspace.get(a)]
        if spent:
            points, amounts = zip(*spent, strict=True)
            most = np.zeros(self.points, dtype=np.int64)
            np.maximum.at(most, np.asarray(points), np.asarray(amounts, dtype=np.int64))
            profile += most
        return profile

    def peak(self, kept, recompute) -> int:
        return int(self.profile(kept, recompute).max(initial=0))

    def at_peak(self, kept, recompute) -> tuple[int, int, list[int]]:
        """The model's peak, the first point where it is reached, and the storages the
        schedule keeps or recomputes that are live there."""
        intervals = self.intervals(kept, recompute)
        profile = self._sum(intervals, recompute, kept)
        if not len(profile):
            return 0, 0, []
        point = int(profile.argmax())
        starts, stops, storages = intervals
        return int(profile[point]), point, storages[(starts <= point) & (stops >= point)].tolist()
