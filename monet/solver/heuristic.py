"""A fast schedule for warm starts and for graphs too large to solve exactly.

Like the knapsack of torch's memory-budget partitioner: recompute the ops that
free the most bytes per second of recomputation first. Given which ops are
recomputed, the rest of the schedule follows: every other storage the backward
reads is kept, and each recomputation runs as late as possible (just before
its first reader, or before the recomputation that needs it). Prefixes of the
ranking are evaluated with the exact simulator, so every schedule this returns
has a true peak, and the cheapest that fits the budget wins.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

from monet.simulate import simulate
from monet.solver.estimate import PeakModel
from monet.solver.ilp import Structure, analyse, touched_nodes
from monet.solver.problem import Problem, alternative_nodes
from monet.solver.program import Program, ScheduleError, build_program, storage_owner
from monet.solver.schedule import Schedule


@dataclass(frozen=True)
class Candidate:
    kept: tuple[int, ...]
    recompute: tuple[tuple[int, int], ...]
    peak: int
    overhead: float
    variants: tuple[int, ...] = ()

    @property
    def hint(self) -> tuple:
        return (self.kept, self.recompute, self.variants)

    @classmethod
    def of(cls, schedule) -> Candidate:
        """A :class:`~monet.solver.schedule.Schedule`'s choices, peak and time."""
        return cls(schedule.kept, schedule.recompute, schedule.predicted_peak,
                   schedule.predicted_overhead, schedule.variants)


def variant_seconds(problem: Problem, variants: tuple[int, ...]) -> float:
    """Seconds the chosen alternatives add to the step's own forward and backward."""
    total = 0.0
    for choice, picked in zip(problem.choices, variants, strict=True):
        for o in choice.alternatives[picked].overrides:
            total += o.time - problem.nodes[o.node].time
    return total


def fastest_variants(problem: Problem) -> tuple[int, ...]:
    """Per choice, the alternative that adds the least time (the captured one on ties)."""
    result = []
    for choice in problem.choices:
        delta = _alternative_seconds(problem, choice)
        result.append(min(range(len(delta)), key=lambda k: (delta[k], k)))
    return tuple(result)


def _alternative_seconds(problem: Problem, choice) -> list[float]:
    """Seconds each alternative of ``choice`` adds to the captured step."""
    return [sum(o.time - problem.nodes[o.node].time for o in a.overrides)
            for a in choice.alternatives]


def leanest_variants(problem: Problem) -> tuple[int, ...]:
    """Per choice, the alternative that makes the backward hold the fewest extra bytes."""
    return tuple(min(range(len(cost)), key=lambda k: (cost[k], k))
                 for cost in alternative_bytes(problem))


def alternative_bytes(problem: Problem) -> list[list[int]]:
    """Per choice and alternative, the bytes of forward values its touched nodes read
    that nothing else in the backward reads, less what it never allocates.

    What a touched node reads costs nothing when an untouched backward node
    reads it anyway (a norm's output, which the next linear's backward reads).
    """
    structure = analyse(problem)
    read_anyway = set(structure.first_read)
    decision = set(structure.decision_storages)
    nodes, sizes = problem.nodes, problem.storage_bytes

    def extra_bytes(inputs: tuple[int, ...]) -> int:
        storages = {s for j in inputs if nodes[j].phase == "forward" for s in nodes[j].storages}
        return sum(sizes[s] for s in storages & decision - read_anyway)

    return [
        [
            sum(extra_bytes(o.inputs) for o in effective.values())
            - sum(sizes[s] for s in alternative.drops)
            for effective, alternative in zip(
                alternative_nodes(problem, choice), choice.alternatives, strict=True)
        ]
        for choice in problem.choices
    ]


def shared_alternative_bytes(problem: Problem) -> list[list[int]]:
    """:func:`alternative_bytes`, computed once per problem (the exchange search and both
    relaxation models ask for it)."""
    cached = problem.__dict__.get("_alternative_bytes")
    if cached is None:
        cached = problem.__dict__["_alternative_bytes"] = alternative_bytes(problem)
    return cached


def schedule_for(
    problem: Problem, structure: Structure, redo: set[int]
) -> tuple[tuple[int, ...], tuple[tuple[int, int], ...]] | None:
    """Kept storages and as-late-as-possible slots when the ops in ``redo`` are recomputed.

    None when a recomputation would need a value that may not be recomputed.
    """
    owner = storage_owner(problem)
    redo = set(redo)
    # A recomputed op reads its inputs again: an input whose op is recomputed is
    # fine, any other must be kept. Storages no recomputation and no backward
    # node reads are dropped.
    outputs_of, recompute_reads = structure.outputs_of, structure.recompute_reads
    read = set().union(*(recompute_reads[a] for a in redo)) if redo else set()
    remade = set().union(*(outputs_of[a] for a in redo)) if redo else set()
    needed = read | structure.first_read.keys()
    kept = needed - remade
    if not redo <= structure.recomputable and any(
            s in needed for a in redo - structure.recomputable for s in outputs_of[a]):
        return None
    slot: dict[int, int] = {}
    readers: dict[int, list[int]] = {}
    for w in redo:
        for s in recompute_reads[w]:
            readers.setdefault(owner[s], []).append(w)
    last = max(len(structure.backward) - 1, 0)
    first_read = structure.first_read
    for a in sorted(redo, reverse=True):  # readers come later in the forward
        candidates = [first_read[s] for s in outputs_of[a] if s in first_read]
        candidates += [slot[w] for w in readers.get(a, ()) if w in slot]
        slot[a] = min(candidates) if candidates else last
    return tuple(sorted(kept)), tuple(sorted(slot.items()))


def ranking(problem: Problem, structure: Structure, skippable_first: bool = False
            ) -> list[int]:
    """Recomputable ops whose outputs the backward reads, most bytes per second of
    the op first (a skippable op's own seconds: recomputed as well as run in the
    forward, it costs them). With ``skippable_first``, every skippable op comes
    first: recomputed and not run in the forward, each runs once, as in eager's
    step, and costs nothing (kept for a reader, it would run twice)."""
    sizes = problem.storage_bytes
    scored = []
    for a in structure.recomputable:
        freed = sum(sizes[s] for s in structure.outputs_of[a] if s in structure.first_read)
        if skippable_first and a in structure.skippable:
            scored.append((-1.0 / (1 + freed), a))
        elif freed:
            seconds = structure.skippable.get(a, structure.cost[a])
            scored.append((seconds / freed, a))
    return [a for _, a in sorted(scored)]


def scan(problem: Problem, evaluations: int = 48, deadline: float | None = None
         ) -> list[Candidate]:
    """Schedules recomputing growing prefixes of the ranking, and checkpointing
    at the forward's narrow points (:func:`segments`), with their exact peaks.

    With operator variants, the scan runs for the fastest and for the leanest
    alternatives (and the captured ones). With ``deadline`` (``time.perf_counter()``),
    each variant vector gets an equal share of the time left and stops evaluating
    when it is spent; the prefixes are evaluated coarse to fine, so a scan cut
    short still spans the ranking.
    """
    vectors = list(dict.fromkeys(
        [fastest_variants(problem), leanest_variants(problem), problem.default_variants()]
    ))
    result = []
    for done, variants in enumerate(vectors):
        share = None
        if deadline is not None:
            now = time.perf_counter()
            share = now + max(0.0, deadline - now) / (len(vectors) - done)
        applied = problem.apply(variants)
        extra = variant_seconds(problem, variants)
        structure = analyse(applied)
        found = _scan(applied, structure, evaluations, share)
        found += segments(applied, structure, deadline=share)
        result += [Candidate(c.kept, c.recompute, c.peak, c.overhead + extra, variants)
                   for c in found]
    return result


def _scan(problem: Problem, structure: Structure, evaluations: int,
          deadline: float | None = None) -> list[Candidate]:
    # With skippable ops, both rankings, half the evaluations each: recomputing all
    # of them first frees what eager's own backward would (a reversible stack's
    # reconstruction); where most ops are skippable, the ranking by bytes per
    # second reaches the budget with fewer of them run twice.
    orders = [ranking(problem, structure)]
    if structure.skippable:
        orders.append(ranking(problem, structure, skippable_first=True))
        evaluations = max(2, evaluations // 2)
    result = []
    for done, order in enumerate(orders):
        if not order:
            continue
        share = deadline
        if deadline is not None:
            now = time.perf_counter()
            share = now + max(0.0, deadline - now) / (len(orders) - done)
        lengths = sorted({round(i * len(order) / (evaluations - 1))
                          for i in range(evaluations)})
        found = []
        for length in coarse_to_fine(lengths):
            if share is not None and time.perf_counter() >= share and found:
                break
            candidate = evaluate(problem, structure, set(order[:length]))
            if candidate is not None:
                found.append(candidate)
        result += found
    return result


def coarse_to_fine(items: list) -> list:
    """``items`` reordered so that every prefix spreads over the whole list: both ends,
    the middle, then the quarters, and so on."""
    if len(items) <= 2:
        return list(items)
    order, seen = [0, len(items) - 1], {0, len(items) - 1}
    parts = [(0, len(items) - 1)]
    while parts:
        split = []
        for low, high in parts:
            if high - low > 1:
                middle = (low + high) // 2
                if middle not in seen:
                    seen.add(middle)
                    order.append(middle)
                split += [(low, middle), (middle, high)]
        parts = split
    return [items[k] for k in order]


def narrow_points(problem: Problem, structure: Structure) -> list[int]:
    """Decision storages that are, when made, (nearly) all the forward carries on,
    where what it carries narrows.

    At the output of a residual add or between two ops of a chain, the one
    value just made is all that later forward ops read of the past: a block
    boundary, found without knowing the blocks. Keeping such a value and
    recomputing the ops between two of them is what ``torch.utils.checkpoint``
    around a block does.
    """
    owner = storage_owner(problem)
    sizes = problem.storage_bytes
    position = {i: p for p, i in enumerate(structure.forward)}
    crossing = [0] * (len(structure.forward) + 1)
    for s in structure.decision_storages:
        born, death = position[owner[s]], structure.forward_death[s]
        if death > born:
            crossing[born] += sizes[s]
            crossing[death] -= sizes[s]
    for p in range(1, len(crossing)):
        crossing[p] += crossing[p - 1]
    result = []
    for s in structure.decision_storages:
        born = position[owner[s]]
        narrows = born > 0 and crossing[born] <= crossing[born - 1]
        if (owner[s] in structure.recomputable and structure.forward_death[s] > born
                and narrows and sizes[s] >= NARROW * crossing[born]):
            result.append(s)
    return sorted(result, key=lambda s: position[owner[s]])


NARROW = 0.9
"""Share of the bytes crossing a forward position that one value must hold to be a boundary."""


def segments(
    problem: Problem, structure: Structure | None = None, strides: int = 12,
    deadline: float | None = None,
) -> list[Candidate]:
    """Keep every k-th narrow value, recompute every other op the backward needs
    as late as possible (k = 1 .. ``strides``), with exact peaks.

    The ranking scan never keeps a boundary while recomputing what surrounds
    it, so it misses the small peaks of per-block checkpointing; these
    schedules reach them, and the exact solver starts from them.
    """
    structure = analyse(problem) if structure is None else structure
    boundaries = narrow_points(problem, structure)
    if not boundaries:
        return []
    owner = storage_owner(problem)
    result = []
    for stride in range(1, min(strides, len(boundaries)) + 1):
        if deadline is not None and time.perf_counter() >= deadline and result:
            break
        keep = {owner[s] for s in boundaries[stride - 1::stride]}
        redo = _useful(structure, structure.recomputable - keep)
        candidate = evaluate(problem, structure, redo)
        if candidate is not None:
            result.append(candidate)
    return result


def _useful(structure: Structure, redo: set[int]) -> set[int]:
    """The ops of ``redo`` whose outputs the backward, or a useful recomputation, reads."""
    useful: set[int] = set()
    for a in sorted(redo, reverse=True):  # readers come later in the forward
        outputs = structure.outputs_of[a]
        if any(s in structure.first_read for s in outputs) or any(
            w in useful for s in outputs for w in structure.readers.get(s, ())
        ):
            useful.add(a)
    return useful


def evaluate(problem: Problem, structure: Structure, redo: set[int]) -> Candidate | None:
    """The schedule recomputing ``redo`` as late as possible, with its exact peak
    (``problem`` has no choices left; None when it cannot run)."""
    made = schedule_for(problem, structure, redo)
    if made is None:
        return None
    kept, recompute = made
    return exact_peak(problem, structure, Candidate(kept, recompute, 0, 0.0))


def estimate(problem: Problem, structure: Structure, model: PeakModel, redo: set[int]
             ) -> Candidate | None:
    """As :func:`evaluate`, with the model's peak (at least the simulated one) instead."""
    made = schedule_for(problem, structure, redo)
    if made is None:
        return None
    kept, recompute = made
    return Candidate(kept, recompute, model.peak(kept, recompute),
                     sum(structure.cost[a] for a, _ in recompute))


def exact_peak(problem: Problem, structure: Structure, candidate: Candidate
               ) -> Candidate | None:
    """``candidate`` (no variants) with its simulated peak and the seconds its program
    adds (:func:`recompute_seconds`); None when it cannot run."""
    program = _program(problem, candidate)
    if program is None:
        return None
    return replace(candidate, peak=simulate(problem, program).peak,
                   overhead=recompute_seconds(structure, program, candidate.recompute))


def _program(problem: Problem, candidate: Candidate) -> Program | None:
    """The program of ``candidate`` (no variants) on ``problem``; None when it cannot run."""
    draft = Schedule(problem.graph_hash, None, candidate.kept, candidate.recompute, 0, 0.0,
                     "heuristic")
    try:
        return build_program(problem, draft)
    except ScheduleError:
        return None


def recompute_seconds(structure: Structure, program: Program,
                      recompute: tuple[tuple[int, int], ...]) -> float:
    """Seconds ``program``'s recomputations add to eager's step (``structure`` is its
    problem's, variants applied): each op's ``cost``, and a skippable op's seconds
    less once, counted for each time the program runs it (in the forward, where a
    kept value needs it, and recomputed): 0 when it runs once, as in eager."""
    total = sum(structure.cost[a] for a, _ in recompute)
    if structure.skippable:
        ran = {step.node for step in program.forward}
        redo = {a for a, _ in recompute}
        total += sum(seconds * ((a in redo) + (a in ran) - 1)
                     for a, seconds in structure.skippable.items())
    return total


SIMULATED = 3
"""Moves simulated per round of the descents, the best by the model's peak."""


def best_within(candidates: list[Candidate], budget: int) -> Candidate | None:
    """The cheapest candidate whose peak fits ``budget``."""
    fitting = [c for c in candidates if c.peak <= budget]
    return min(fitting, key=lambda c: (c.overhead, c.peak)) if fitting else None


def least_peak(candidates: list[Candidate]) -> Candidate | None:
    return min(candidates, key=lambda c: (c.peak, c.overhead)) if candidates else None


TRIM_SHARE = 0.2
"""Share of :func:`relax_and_repair`'s time limit kept for trimming its answer on the simulator."""


def relax_and_repair(
    problem: Problem, budget: int, time_limit: float = 4.0, rounds: int = 4
) -> tuple[list[Candidate], float]:
    """Schedules from the interval relaxation's 0/1 answers, each with its exact peak.

    The relaxation (:mod:`monet.solver.relaxation`) picks recomputations and
    variants under a model that leaves the recomputations' own bytes out, so
    its answer can exceed ``budget``; each round lowers the relaxation's
    budget by the overshoot and solves again, until a schedule fits: first
    the LP's answers, rounded (fast; a choice the LP splits held to its leanest
    part and solved again), then the weaker model's 0/1 program's (:class:`~monet.
    solver.relaxation.Relaxation` without ``kept_for_variants``). The full relaxation's
    LP, and the 0/1 program where higher, give the bound; :func:`fit_and_trim` then trims
    the cheapest answer that fits (in the last ``TRIM_SHARE`` of ``time_limit``).
    Also returns the relaxation's lower bound on the added time within ``budget``
    (``inf``: nothing fits; ``-inf``: none found in time).
    """
    from monet.solver.relaxation import Relaxation

    started = time.perf_counter()
    answers: list[tuple[Candidate, tuple[int, ...]]] = []
    # The weaker model's 0/1 program is solved fastest and its lowered budgets reach
    # a fitting answer in a few rounds; the full one bounds better. Their LPs take
    # 0.1–0.2 s on the zoo's graphs: the full one's come first, its bound 3–17% higher
    # (ConvNeXt-T at 0.5 of keep-all: -48.7 ms against -58.6) and its answers nearer
    # the budget (9% over there against 24%).
    models = [Relaxation(problem, False), Relaxation(problem, True)]
    # The LP's rounded answers, the budget lowered by each overshoot, fit within a
    # second or two where a 0/1 solve cut short finds none (MViTv2-T at 0.5 of eager's
    # peak: an answer adding 106 ms in 1.3 s, none from 0/1 solves given 4 s).
    found, bound, _ = _lower_until_fits(problem, models[1], budget, started + time_limit,
                                        2 * rounds, integral=False)
    if bound == math.inf:
        return [], bound
    answers += found
    if any(c.peak <= budget and c.overhead + variant_seconds(problem, v) <= bound + 1e-12
           for c, v in found):
        # An answer that fits at the LP's bound is optimal: nothing is left to find.
        return _with_variants(problem, found), bound
    # Then the weaker model's 0/1 rounds, with time left for the trim. The full model's
    # 0/1 program is not tried here: ``solve``'s child process proves its bound
    # (:class:`monet.solver.relaxation.BackgroundBound`), and its answer at the budget,
    # a solve cut short, overshot it far (SAM2 Hiera-T at 0.3 of eager's peak: 2.2x,
    # after 2 s of the 4.5) and left the trim too little time (801.8-809.7 ms in 0.7 s
    # where 783.6 in 1.8; the 10 s solves 770.4-803.9 against 813.5).
    found, model_bound, _ = _lower_until_fits(
        problem, models[0], budget, started + (1 - TRIM_SHARE) * 0.75 * time_limit, rounds)
    bound = max(bound, model_bound)
    answers += found
    # The cheapest answer that fits was likely asked for less than the budget
    # and recomputes more than it needs: trim it, in what time is left.
    fitting = [a for a in answers if a[0].peak <= budget]
    result = list(answers)
    for candidate, variants in sorted(
            fitting, key=lambda a: a[0].overhead + variant_seconds(problem, a[1]))[:1]:
        trimmed = fit_and_trim(problem.apply(variants), candidate, budget,
                               max(started + time_limit, time.perf_counter() + 0.1))
        if trimmed is not None:
            result.append((trimmed, variants))
    return _with_variants(problem, result), bound


def _with_variants(problem: Problem, answers: list[tuple[Candidate, tuple[int, ...]]]
                   ) -> list[Candidate]:
    """Each answer as a candidate naming its variants and counting their seconds."""
    return [replace(c, variants=v, overhead=c.overhead + variant_seconds(problem, v))
            for c, v in answers]


def _lower_until_fits(problem: Problem, model, budget: int, deadline: float, rounds: int,
                      integral: bool = True,
                      ) -> tuple[list[tuple[Candidate, tuple[int, ...]]], float, bool]:
    """0/1 answers of ``model`` (without ``integral``: its LP's, rounded), its budget
    lowered by each overshoot until one fits, with the model's bound at ``budget`` and
    whether a solve overran its time limit (the rounds then stop). An LP's budget lowered
    past what the model admits is raised halfway back to the last one it admitted, and one
    whose answer is worse than the best so far halfway back to the best one's."""
    answers = []
    target, bound = budget, -math.inf
    admitted, refused, push = budget, None, 1
    best_target = budget  # the budget whose answer peaked least
    for done in range(rounds):
        left = deadline - time.perf_counter()
        if left < 0.2 and (integral or done):
            break
        # An LP is solved or not; its time barely depends on the budget.
        limit = left / (rounds - done) if integral else max(left, 0.2)
        began = time.perf_counter()
        relaxation = model.solve(target, integral, limit)
        if relaxation.bound == math.inf:
            if target == budget:
                return answers, math.inf, False
            if integral:
                break  # a 0/1 solve takes seconds: not spent on bisecting
            refused, target = target, (target + admitted) // 2
            continue
        if time.perf_counter() - began > OVERRUN * limit + 0.2:
            return answers, max(bound, relaxation.bound) if target == budget else bound, True
        if target == budget:
            bound = relaxation.bound
        if relaxation.redo is None:
            break
        if relaxation.lean is not None:
            # A split choice: each held to its leanest part, the LP answers again.
            held = model.solve(target, integral, max(0.2, deadline - time.perf_counter()),
                               variants=relaxation.lean)
            if held.redo is not None and held.bound < math.inf:
                relaxation = held
        variants = relaxation.variants or ()
        applied = problem.apply(variants)
        candidate = evaluate(applied, analyse(applied), set(relaxation.redo))
        if candidate is None:
            break
        least = min((c.peak for c, _ in answers), default=None)
        answers.append((candidate, variants))
        if candidate.peak <= budget:
            break
        if least is not None and candidate.peak > least:
            # Lowered further, the rounded answer got worse than the best so far (the ViT
            # demo at 0.3: 1.32x the budget, then 2.91, 3.69, 4.15x): back halfway toward
            # the budget that gave the best.
            target = (target + best_target) // 2
            continue
        if candidate.peak == least:
            push *= 2  # the rounded answer did not move: lower the budget faster
        best_target = target
        step = max(candidate.peak - budget, budget // 200)
        admitted, target = target, target - push * step
        if refused is not None and target <= refused:
            target = (admitted + refused) // 2
    return answers, bound, False


OVERRUN = 1.5
"""A relaxation solve taking this many times its time limit has overrun it."""


def lower_peak(problem: Problem, start: Candidate, deadline: float, tries: int = 12,
               stop_at: int | None = None, simulated: int = SIMULATED) -> Candidate:
    """Greedy descent on the peak from ``start`` (``problem`` has no choices left).

    At the simulated peak, the largest storages decide: a kept one may be
    recomputed instead, a recomputed one kept instead (its recomputation then
    no longer stacks up at the peak). Each round ranks that move for the
    ``tries`` largest of each kind, as late as possible, by the model's peak
    (:class:`~monet.solver.estimate.PeakModel`), simulates the ``simulated``
    best and keeps the one that lowers the peak most, until none does,
    ``deadline`` (``time.perf_counter()``) passes, or the peak is at most ``stop_at``.
    """
    structure = analyse(problem)
    model = PeakModel(problem, structure)
    owner = storage_owner(problem)
    sizes = problem.storage_bytes
    best = start
    redo = {a for a, _ in start.recompute}

    def weight(a: int) -> int:
        return -sum(sizes[s] for s in structure.outputs_of[a])

    while time.perf_counter() < deadline and (stop_at is None or best.peak > stop_at):
        draft = Schedule(problem.graph_hash, None, best.kept, best.recompute, 0, 0.0, "heuristic")
        live = simulate(problem, build_program(problem, draft)).live_at_peak
        ops = {owner[s]: copy for s, copy in live if owner[s] in structure.outputs_of}
        recompute = sorted((a for a, c in ops.items() if c == 0 and a in structure.recomputable
                            and a not in redo), key=weight)
        keep = sorted((a for a, c in ops.items() if c == 1 and a in redo), key=weight)
        moves = [redo | {a} for a in recompute[:tries]] + [redo - {a} for a in keep[:tries]]
        ranked = sorted(filter(None, (estimate(problem, structure, model, _useful(structure, m))
                                      for m in moves)), key=lambda e: (e.peak, e.overhead))
        found = None
        for guess in ranked[:simulated]:
            if time.perf_counter() >= deadline:
                break
            candidate = exact_peak(problem, structure, guess)
            if candidate is not None and candidate.peak < (found or best).peak:
                found = candidate
        if found is None:
            break
        best = found
        redo = {a for a, _ in best.recompute}
    return best


def fit_and_trim(problem: Problem, start: Candidate, budget: int, deadline: float,
                 tries: int = 6, simulated: int = SIMULATED) -> Candidate | None:
    """From ``start`` (``problem`` has no choices left), a schedule within ``budget``
    that recomputes little: None when none is found before ``deadline``.

    Fit: while the simulated peak exceeds the budget, of the storages live at
    the steps above it, recompute the kept one that lowers the overshoot most
    per second it adds, or keep a recomputed one whose early recomputation
    stacks up there. Trim: then keep, most expensive first, every recomputed op
    the budget does without. The model's peak ranks the moves; the ``simulated``
    best of each round are simulated, and the answer's peak is the simulator's.
    """
    structure = analyse(problem)
    model = PeakModel(problem, structure)
    owner = storage_owner(problem)
    sizes = problem.storage_bytes
    best = start
    redo = {a for a, _ in start.recompute}

    def pressure_of(candidate: Candidate) -> dict[tuple[int, int], int]:
        """(op, copy) → the most bytes of its outputs live at a step above the budget,
        leaving out what that step reads (no schedule frees those there)."""
        draft = Schedule(problem.graph_hash, None, candidate.kept, candidate.recompute, 0, 0.0,
                         "heuristic")
        program = build_program(problem, draft)
        result: dict[tuple[int, int], int] = {}
        for step in simulate(problem, program, over=budget).crowded:
            ran = (program.forward if step.phase == "forward" else program.backward)[step.index]
            read = {s for node, _ in ran.reads for s in problem.nodes[node].storages}
            for s, copy in step.live:
                a = owner[s]
                if s not in read and a in structure.outputs_of and (
                        copy == 1 or a in structure.recomputable):
                    result[a, copy] = max(result.get((a, copy), 0), sizes[s])
        return result

    while best.peak > budget:
        if time.perf_counter() >= deadline:
            return None
        pressure = pressure_of(best)
        kept = set(best.kept)
        chains = {a: _chain(structure, owner, sizes, kept, redo, a, pressure)
                  for a, copy in pressure if copy == 0 and a not in redo}
        gain = {k: (chains[k[0]][1] if k[1] == 0 and k[0] in chains else pressure[k])
                for k in pressure}
        ranked = sorted((k for k in pressure if gain[k] > 0),
                        key=lambda k: -gain[k] / max(structure.cost[k[0]], 1e-9))
        recompute = [chains[a][0] for a, copy in ranked if copy == 0 and a in chains][:tries]
        single = [{a} for a, copy in ranked if copy == 0 and a in chains and pressure[a, 0] > 0
                  and {a} not in recompute]
        recompute += single[:tries // 2]
        keep = [a for a, copy in ranked if copy == 1 and a in redo][:tries]
        # The model ranks the moves by peak lowered per second added; the best few
        # are simulated (the model's peak is never below the simulated one).
        modelled = model.peak(best.kept, best.recompute)
        guesses = []
        for move in [redo | ops for ops in recompute] + [redo - {a} for a in keep]:
            guess = estimate(problem, structure, model, _useful(structure, move))
            if guess is not None:
                guesses.append((_score(modelled - guess.peak, guess.overhead - best.overhead),
                                guess))
        guesses.sort(key=lambda g: -g[0])
        found, found_score = None, 0.0
        for _, guess in guesses[:simulated]:
            if time.perf_counter() >= deadline:
                break
            candidate = exact_peak(problem, structure, guess)
            if candidate is None or candidate.peak >= best.peak:
                continue
            score = _score(best.peak - candidate.peak, candidate.overhead - best.overhead)
            if score == math.inf or score > found_score:
                found, found_score = candidate, score
        if found is None:
            return None
        best = found
        redo = {a for a, _ in best.recompute}
    simulated_best = best
    for a in sorted(redo, key=lambda a: -structure.cost[a]):
        if time.perf_counter() >= deadline:
            break
        if a not in redo:
            continue
        guess = estimate(problem, structure, model, _useful(structure, redo - {a}))
        if guess is None or guess.overhead >= best.overhead:
            continue
        if guess.peak > budget:
            # The model may overstate: simulate the near misses.
            if guess.peak > NEAR_MISS * budget:
                continue
            guess = exact_peak(problem, structure, guess)
            if guess is None or guess.peak > budget:
                continue
        best = guess
        redo = {b for b, _ in best.recompute}
    if best is simulated_best:
        return best
    # A trim the model accepted fits (the model never understates); its peak is simulated.
    final = exact_peak(problem, structure, best)
    # The model's seconds leave out a skippable op run twice; the simulated ones do not.
    if final is None or final.overhead > simulated_best.overhead:
        return simulated_best
    return final


def _score(lowered: float, added: float) -> float:
    """Bytes a move lowers the peak by per second it adds (inf: it adds none)."""
    if lowered <= 0:
        return -math.inf
    return math.inf if added <= 0 else lowered / max(added, 1e-9)


NEAR_MISS = 1.06
"""A trim whose model peak exceeds the budget by less than this factor is simulated: the
model overstates the peak by up to a few percent on the zoo's graphs."""
NEAR_MISS_TRIES = 16
"""Near misses an exchange search simulates before it stops where the model has
overstated none of them."""


WORKSPACE_SWITCHES = 2
"""Switches per pass of :func:`exchange` that only save workspace (:func:`_workspace_switches`)."""


def exchange(problem: Problem, start: Candidate, budget: int, deadline: float,
             additions: int = 8, options: int = 12, switches: int = 8) -> Candidate:
    """Local search from ``start`` (within ``budget``) over what is recomputed and
    which alternative each choice runs, while that lowers the added time.

    Two moves, in passes until one changes nothing or ``deadline``
    (``time.perf_counter()``) passes:

    * run another alternative of one choice (the ``switches`` best of
      :func:`_switches` per pass, and the ``WORKSPACE_SWITCHES`` best of
      :func:`_workspace_switches`), refill if it no longer fits, then keep every
      recomputed op the budget does without;
    * stop recomputing one op (most expensive first) and make room for what that
      keeps by recomputing cheaper ones (:func:`_refill`).

    The model's peak (:class:`~monet.solver.estimate.PeakModel`) decides; it is
    never below the simulated one, so what the model fits does fit, and near
    misses are simulated. The answer's peak is the simulator's.
    """
    contexts: dict[tuple[int, ...], _Context] = {}
    misses = _NearMisses()

    def context(variants: tuple[int, ...]) -> _Context:
        if variants not in contexts:
            contexts[variants] = _Context.of(problem, variants, misses)
        return contexts[variants]

    def switched(best: Candidate, c: int, k: int) -> Candidate | None:
        """``best`` with choice ``c`` running alternative ``k``, refilled and trimmed,
        with its program's seconds (None: nothing fits that the model puts below
        ``best``'s seconds)."""
        variants = best.variants[:c] + (k,) + best.variants[c + 1:]
        there = context(variants)
        trial = {b for b, _ in best.recompute} & there.structure.recomputable
        found = _refill(there, trial, budget, math.inf, deadline, additions, options)
        found = found and there.trimmed(found, budget, deadline)
        if found is None or found.overhead >= best.overhead:
            return None
        # The program may add time the model's did not: compare again, or the
        # search can cycle through worse answers until its deadline.
        return there.timed(found)

    def switch(best: Candidate) -> Candidate:
        # Each switch is tried from the pass's vector, and those that gain are then
        # applied one onto another, the best first. Taken as found, a first gain
        # can lead away from a better one (SAM2 Hiera-T at 0.35 of eager's peak:
        # 662 ms added against 645); one switch per pass takes a pass per switch
        # where many small ones pay (ConvNeXt-T at 0.45: 235 ms against 111).
        gains = []
        for c, k in (_switches(problem, best.variants)[:switches]
                     + _workspace_switches(problem, best.variants)[:WORKSPACE_SWITCHES]):
            if time.perf_counter() >= deadline:
                break
            found = switched(best, c, k)
            if found is not None and found.overhead < best.overhead:
                gains.append((found.overhead, c, k, found))
        if not gains:
            return best
        gains.sort(key=lambda g: g[:3])
        start, best = best, gains[0][3]
        for _, c, k, _ in gains[1:]:
            if time.perf_counter() >= deadline:
                break
            if best.variants[c] == start.variants[c]:
                found = switched(best, c, k)
                if found is not None and found.overhead < best.overhead:
                    best = found
        return best

    def drop(best: Candidate) -> Candidate:
        redo = {b for b, _ in best.recompute}
        here = context(best.variants)
        for a in sorted(redo, key=lambda a: -here.structure.cost[a]):
            if time.perf_counter() >= deadline:
                break
            if a not in redo:
                continue
            found = _refill(here, redo - {a}, budget, best.overhead, deadline, additions,
                            options)
            found = found and here.timed(found)
            if found is not None and found.overhead < best.overhead:
                best = found
                redo = {b for b, _ in best.recompute}
        return best

    first = best = replace(start, variants=start.variants or problem.default_variants())
    improved = True
    while improved and time.perf_counter() < deadline:
        improved = False
        for move in (switch, drop):
            found = move(best)
            improved |= found is not best
            best = found
    if best is first:
        return best
    # The moves compare the programs' seconds on the model's peaks (never below the
    # simulated ones); the answer's peak is the simulator's, found once here (a
    # simulation per move took 45% of the search near ConvNeXt-T's least peak).
    exact = context(best.variants).simulated(best, budget)
    return first if exact is None else exact


@dataclass
class _NearMisses:
    """What simulating the model's near misses has paid in one search: the model
    equals the simulator on most schedules, and near ConvNeXt-T's least peak 514
    near misses simulated in a 10 s exchange search (45% of it) fitted none, the
    model exact on every one (MViTv2-T, SAM2 Hiera-T and the ViT demo alike)."""

    tried: int = 0
    overstated: int = 0

    def worth_it(self) -> bool:
        """Simulate the next one: the first ``NEAR_MISS_TRIES``, and all of them once the
        model has overstated a peak."""
        return self.overstated > 0 or self.tried < NEAR_MISS_TRIES


@dataclass(frozen=True)
class _Context:
    """One variant vector's applied problem, structure, model and seconds."""

    variants: tuple[int, ...]
    problem: Problem
    structure: Structure
    model: PeakModel
    extra: float
    """Seconds the variants add to the step."""
    misses: _NearMisses

    @classmethod
    def of(cls, problem: Problem, variants: tuple[int, ...], misses: _NearMisses
           ) -> _Context:
        applied = problem.apply(variants)
        structure = analyse(applied)
        return cls(variants, applied, structure, PeakModel(applied, structure),
                   variant_seconds(problem, variants), misses)

    def near_miss(self, guess: Candidate, budget: int) -> Candidate | None:
        """``guess``, which the model puts a little over ``budget``, simulated where that
        has been worth it in this search (:class:`_NearMisses`); None when it does not
        fit or is not tried."""
        if not self.misses.worth_it():
            return None
        exact = self._exact(guess)
        self.misses.tried += 1
        if exact is None:
            return None
        self.misses.overstated += exact.peak < guess.peak
        return exact if exact.peak <= budget else None

    def estimate(self, redo: set[int]) -> Candidate | None:
        """The schedule recomputing ``redo`` (as late as possible) with the model's peak."""
        found = estimate(self.problem, self.structure, self.model, _useful(self.structure, redo))
        if found is None:
            return None
        return replace(found, overhead=found.overhead + self.extra, variants=self.variants)

    def timed(self, candidate: Candidate) -> Candidate | None:
        """``candidate`` with the seconds its program adds (the model's leave out a
        skippable op run twice), its peak as it was (the model's, never below the
        simulated one, or the simulator's); None when it cannot run."""
        program = _program(self.problem, candidate)
        if program is None:
            return None
        return replace(candidate, overhead=recompute_seconds(
            self.structure, program, candidate.recompute) + self.extra)

    def simulated(self, candidate: Candidate, budget: int) -> Candidate | None:
        """``candidate`` with its simulated peak; None when that exceeds ``budget``."""
        exact = self._exact(candidate)
        return exact if exact is not None and exact.peak <= budget else None

    def _exact(self, candidate: Candidate) -> Candidate | None:
        """``candidate`` with its simulated peak and its program's seconds."""
        exact = exact_peak(self.problem, self.structure, replace(candidate, variants=()))
        if exact is None:
            return None
        return replace(exact, variants=self.variants, overhead=exact.overhead + self.extra)

    def trimmed(self, candidate: Candidate, budget: int, deadline: float) -> Candidate:
        """``candidate`` without each recomputation (most expensive first) the model
        still fits ``budget`` without."""
        redo = {a for a, _ in candidate.recompute}
        for a in sorted(redo, key=lambda a: -self.structure.cost[a]):
            if time.perf_counter() >= deadline:
                break
            if a in redo:
                guess = self.estimate(redo - {a})
                if guess is not None and guess.peak <= budget:
                    candidate, redo = guess, {b for b, _ in guess.recompute}
        return candidate


def _refill(context: _Context, trial: set[int], budget: int, limit: float, deadline: float,
            additions: int, options: int) -> Candidate | None:
    """``trial`` and at most ``additions`` more recomputations, within ``budget`` and
    adding less than ``limit`` seconds; None if not found.

    Each round recomputes a kept value live at the model's peak that no backward
    node has read by then, with the producers its recomputation would otherwise
    need kept (:func:`_producers`): of the ``options`` whose ops free the most
    bytes per second, the one that lowers the model's peak most per second it adds.
    The answer's peak is the model's (at most ``budget``) or, for a near miss, the
    simulator's.
    """
    structure, model = context.structure, context.model
    owner, sizes = storage_owner(context.problem), context.problem.storage_bytes
    for _ in range(additions + 1):
        if time.perf_counter() >= deadline:
            return None
        guess = context.estimate(trial)
        if guess is None or guess.overhead >= limit - 1e-12:
            return None
        peak, point, live = model.at_peak(guess.kept, guess.recompute)
        if peak <= budget:
            return guess
        if peak <= NEAR_MISS * budget:
            exact = context.near_miss(guess, budget)
            if exact is not None:
                return exact
        kept = set(guess.kept)
        ratio: dict[int, float] = {}
        for s in live:
            b = owner[s]
            # Recomputed as late as possible, s is made after the peak's point only
            # if no backward node at or before that point reads it.
            if (s in kept and b in structure.recomputable and b not in trial
                    and model.first_point(s) > point):
                ratio[b] = ratio.get(b, 0) + sizes[s] / max(structure.cost[b], 1e-9)
        found, found_score = None, 0.0
        for b in sorted(ratio, key=lambda b: -ratio[b])[:options]:
            ops = _producers(structure, owner, kept, trial, b)
            option = context.estimate(trial | ops)
            if option is None:
                continue
            score = _score(peak - option.peak, option.overhead - guess.overhead)
            if score > found_score:
                found, found_score = ops, score
        if found is None:
            return None
        trial = trial | found
    return None


def leaner_at_peak(problem: Problem, start: Candidate, deadline: float, tries: int = 8
                   ) -> Candidate | None:
    """``start`` with one choice run otherwise, where that lowers the simulated peak most:
    of the choices whose nodes read (or whose alternatives leave unfilled) a storage
    live at the peak, the ``tries`` alternatives that hold the fewest bytes (None: none
    lowers it, or ``deadline`` passed). What ``start`` recomputes stays recomputed where
    the alternative allows it. For a start the descent on the peak cannot bring within
    a budget with its variants: ConvNeXt-T at 0.5 of keep-everything's peak stalled 2%
    over, its peak at a stage-1 MLP's backward that the chunked MLP takes apart."""
    variants = start.variants or problem.default_variants()
    applied = problem.apply(variants)
    redo = {a for a, _ in start.recompute}
    draft = Schedule(problem.graph_hash, None, start.kept, start.recompute, 0, 0.0,
                     "heuristic", variants=variants)
    try:
        live = {s for s, _ in simulate(problem, build_program(problem, draft)).live_at_peak}
    except ScheduleError:
        return None
    # The forward's values only: every choice's nodes read the parameters.
    owner = storage_owner(applied)
    live = {s for s in live if applied.nodes[owner[s]].phase == "forward"}
    nodes = applied.nodes
    near = {c for c, choice in enumerate(problem.choices)
            if any(live.intersection(a.drops) for a in choice.alternatives)}
    near |= {c for i, c in touched_nodes(problem).items()
             if any(live.intersection(nodes[k].storages) for k in nodes[i].inputs)}
    leanness = shared_alternative_bytes(problem)
    options = sorted((leanness[c][k] - leanness[c][variants[c]], c, k) for c in near
                      for k in range(len(problem.choices[c].alternatives))
                      if k != variants[c] and leanness[c][k] < leanness[c][variants[c]])
    best = None
    for _, c, k in options[:tries]:
        if time.perf_counter() >= deadline:
            break
        switched = variants[:c] + (k,) + variants[c + 1:]
        there = problem.apply(switched)
        structure = analyse(there)
        found = evaluate(there, structure, redo & structure.recomputable)
        if found is not None and found.peak < (best or start).peak:
            best = replace(found, variants=switched,
                           overhead=found.overhead + variant_seconds(problem, switched))
    return best


def _switches(problem: Problem, variants: tuple[int, ...]) -> list[tuple[int, int]]:
    """The switches (choice, alternative) of one choice of ``variants``: those that save
    time first, then those that save the most bytes (:func:`alternative_bytes`; a
    few large savings let the costliest recomputations go, many small ones rarely
    do); none that saves neither."""
    cached = shared_alternative_bytes(problem)
    ranked = []
    for c, choice in enumerate(problem.choices):
        seconds = _alternative_seconds(problem, choice)
        now = variants[c]
        for k in range(len(choice.alternatives)):
            added = seconds[k] - seconds[now]
            saved = cached[c][now] - cached[c][k]
            if k == now or (added >= 0 and saved <= 0):
                continue
            ranked.append((added >= 0, -saved, added, c, k))
    return [(c, k) for *_, c, k in sorted(ranked)]


def _workspace_switches(problem: Problem, variants: tuple[int, ...]) -> list[tuple[int, int]]:
    """The switches (choice, alternative) of one choice of ``variants`` to an alternative that
    holds no fewer bytes and is no faster but needs less workspace, the most saved
    first: a kernel that needs less scratch space where the peak may be. :func:`_switches`
    leaves them out, as they lower the peak only where that node runs at it (SAM2
    Hiera-T at 0.3 of eager's peak: the native kernel of a convolution's backward needs
    72 MiB less there, and the search that tries it adds 774.6 ms against 836.7; ranked
    with the rest by bytes, ConvNeXt-T's such switches, far from its peak, took the
    search's time: 58.4 ms added at 0.5 against 54.2, medians of four)."""
    cached = shared_alternative_bytes(problem)
    ranked = []
    for c, choice in enumerate(problem.choices):
        seconds = _alternative_seconds(problem, choice)
        workspace = [sum(o.workspace - problem.nodes[o.node].workspace for o in a.overrides)
                     for a in choice.alternatives]
        now = variants[c]
        for k in range(len(choice.alternatives)):
            less = workspace[now] - workspace[k]
            if (k != now and less > 0 and seconds[k] >= seconds[now]
                    and cached[c][k] >= cached[c][now]):
                ranked.append((-less, seconds[k] - seconds[now], c, k))
    return [(c, k) for *_, c, k in sorted(ranked)]


def _producers(structure: Structure, owner, kept: set[int], redo: set[int], a: int,
               depth: int = 6) -> set[int]:
    """``a`` and, up to ``depth`` producers back, the recomputable ops whose values its
    recomputation reads and nothing keeps or recomputes yet."""
    ops = {a}
    for grown in _producer_layers(structure, owner, kept, redo, a, depth):
        ops |= grown
    return ops


def _producer_layers(structure: Structure, owner, kept: set[int], redo: set[int], a: int,
                     depth: int):
    """The ops :func:`_producers` adds, one producer further back at a time."""
    ops = {a}
    for _ in range(depth):
        grown = {owner[s] for b in ops for s in structure.recompute_reads[b]
                 if s not in kept and owner[s] not in redo and owner[s] not in ops
                 and owner[s] in structure.recomputable}
        if not grown:
            return
        ops |= grown
        yield grown


def _chain(structure: Structure, owner, sizes, kept: set[int], redo: set[int], a: int,
           pressure: dict[tuple[int, int], int], depth: int = 4) -> tuple[set[int], int]:
    """Ops to recompute so that ``a``'s outputs leave the crowded steps, and the bytes
    that frees there: ``a`` and, up to ``depth`` producers back, those whose values
    its recomputation would otherwise have to keep (a chain back to a kept value)."""
    ops = {a}
    freed = pressure.get((a, 0), 0)
    best = (set(ops), freed - _new_keeps(structure, owner, sizes, kept, redo, ops))
    for grown in _producer_layers(structure, owner, kept, redo, a, depth):
        ops |= grown
        freed += sum(pressure.get((b, 0), 0) for b in grown)
        net = freed - _new_keeps(structure, owner, sizes, kept, redo, ops)
        if net > best[1]:
            best = (set(ops), net)
    return best


def _new_keeps(structure: Structure, owner, sizes, kept: set[int], redo: set[int],
               ops: set[int]) -> int:
    """Bytes of the values recomputing ``ops`` reads that nothing keeps or recomputes yet."""
    return sum(sizes[s] for s in {s for b in ops for s in structure.recompute_reads[b]}
               if s not in kept and owner[s] not in redo and owner[s] not in ops)
