"""Property tests: budgets, problem and schedule files, and the solver on random graphs.

Every class of input is counted (``hypothesis.event`` and a module counter
printed at the end; run with ``-s`` or ``--hypothesis-show-statistics``).
Each defect these properties found has its own test below as well.
"""

from __future__ import annotations

import copy
import math
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import monet
from monet.simulate import simulate
from monet.solver import (
    InfeasibleBudgetError,
    Problem,
    ProblemFileError,
    Schedule,
    build_program,
    keep_all,
    minimum_budget,
    solve,
)
from monet.solver.problem import structure_hash
from monet.solver.random_graphs import random_problem

COUNTS: Counter[tuple[str, ...]] = Counter()
HUGE = 10**400  # an integer JSON allows and float() cannot convert

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)


def _count(*key: str) -> None:
    COUNTS[key] += 1
    event(" / ".join(key))


@pytest.fixture(scope="module", autouse=True)
def _print_counts():
    yield
    print("\n-- test_properties: examples per class --")
    for key, number in sorted(COUNTS.items()):
        print(f"  {' / '.join(key)}: {number}")


# ------------------------------------------------------------------ budgets

def _check_budget_result(result: Any) -> str:
    kind, value = result
    assert isinstance(value, float)
    if kind == "bytes":
        assert value > 0 and math.isfinite(value) and value == int(value)
    else:
        assert kind == "fraction"
        assert 0 < value <= 1
    return kind


budget_inputs = st.one_of(
    st.text(max_size=24),
    st.text(alphabet="0123456789.eE+- kKmMgGtTiIbB\t", max_size=16),
    st.integers(min_value=-(2**1000), max_value=2**1000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.none(),
    st.booleans(),
    st.lists(st.integers(), max_size=2),
    st.binary(max_size=4),
)


@SETTINGS
@given(budget_inputs)
def test_parse_budget_returns_a_valid_budget_or_raises_value_error(budget):
    try:
        result = monet.parse_budget(budget)
    except ValueError:
        _count("parse_budget", type(budget).__name__, "ValueError")
        return
    _count("parse_budget", type(budget).__name__, _check_budget_result(result))


UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30,
}


@SETTINGS
@given(
    st.integers(min_value=1, max_value=2**40),
    st.sampled_from(sorted(UNITS)),
    st.sampled_from(["", " ", "  "]),
    st.sampled_from([str, str.lower, str.upper]),
)
def test_parse_budget_round_trips_sizes_with_units(number, unit, space, case):
    assume(number * UNITS[unit] < 2**62)  # larger budgets are refused: no device has them
    kind, value = monet.parse_budget(f"{number}{space}{case(unit)}")
    assert kind == "bytes"
    assert value == float(number * UNITS[unit]) or value == float(int(float(number) * UNITS[unit]))
    _count("parse_budget round trip", unit or "(none)")


@SETTINGS
@given(st.floats(min_value=0, max_value=1, exclude_min=True))
def test_parse_budget_round_trips_fractions(fraction):
    assert monet.parse_budget(fraction) == ("fraction", fraction)
    _count("parse_budget round trip", "fraction")


def test_parse_budget_huge_int_is_a_value_error():
    with pytest.raises(ValueError):
        monet.parse_budget(2**1024)


# ----------------------------------------------- problem and schedule files

def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix] if prefix else []
    if isinstance(obj, dict):
        for key, value in obj.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            found += _paths(value, (*prefix, index))
    return found


REPLACEMENTS = [None, "x", "1e5", [], {}, [1, "a"], 1.5, True, False, 0, -1, 2**63, HUGE,
                float("nan"), float("inf")]


def _mutate(data: dict, draw) -> tuple[str, tuple, Any, dict]:
    """One mutation of a JSON object: (kind, path, new value or None, mutated copy)."""
    data = copy.deepcopy(data)
    path = draw(st.sampled_from(_paths(data)))
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    value = parent[path[-1]]
    kinds = ["delete", "type"]
    if isinstance(value, list) and value:
        kinds.append("truncate")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        kinds.append("number")
    kind = draw(st.sampled_from(kinds))
    new: Any = None
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "type":
        new = parent[path[-1]] = draw(st.sampled_from(REPLACEMENTS))
    elif kind == "truncate":
        new = parent[path[-1]] = value[: draw(st.integers(0, len(value) - 1))]
    else:
        new = parent[path[-1]] = draw(st.sampled_from(
            [value + 1, value - 1, 0, -value, value * 1000, -1, HUGE, 2**63]
        ))
    return kind, path, new, data


def _rehash(data: dict) -> bool:
    """Recompute ``graph_hash`` for edited nodes, so validation past the hash is reached."""
    try:
        nodes = [
            SimpleNamespace(
                op=n["op"], phase=n["phase"], inputs=tuple(n["inputs"]),
                storages=tuple(n["storages"]), allocates=tuple(n["allocates"]),
                recomputable=n["recomputable"], is_output=n["is_output"],
            )
            for n in data["nodes"]
        ]
        data["graph_hash"] = structure_hash(nodes, tuple(data["storage_bytes"]))
    except (KeyError, TypeError):
        return False
    return True


@pytest.fixture(scope="module")
def base_files() -> dict[int, tuple[Problem, dict, dict]]:
    files = {}
    for seed in range(4):
        problem = random_problem(8, seed)
        least, _ = minimum_budget(problem, time_limit=2)
        budget = (least.budget + keep_all(problem).predicted_peak) // 2
        schedule = solve(problem, budget, time_limit=2)  # keeps some, recomputes some
        files[seed] = (problem, problem.to_json(), schedule.to_json())
    return files


@SETTINGS
@given(seed=st.integers(0, 3), rehash=st.booleans(), data=st.data())
def test_mutated_problem_files_load_or_raise_problem_file_error(base_files, seed, rehash, data):
    problem, original, _ = base_files[seed]
    kind, _, _, mutated = _mutate(original, data.draw)
    rehashed = rehash and _rehash(mutated)
    tag = "rehashed" if rehashed else "hash kept"
    try:
        loaded = Problem.from_json(mutated)
    except ProblemFileError:
        _count("problem", kind, tag, "ProblemFileError")
        return
    _count("problem", kind, tag, "loaded")
    assert loaded.structure_hash() == loaded.graph_hash
    if not rehashed:
        assert loaded.structure_hash() == problem.structure_hash()


@SETTINGS
@given(seed=st.integers(0, 3), data=st.data())
def test_mutated_schedule_files_load_or_raise_problem_file_error(base_files, seed, data):
    problem, _, original = base_files[seed]
    kind, _, _, mutated = _mutate(original, data.draw)
    try:
        loaded = Schedule.from_json(mutated, problem)
    except ProblemFileError:
        _count("schedule", kind, "ProblemFileError")
        return
    assert loaded.graph_hash == problem.graph_hash
    # A schedule that loads runs, and its predicted peak is its true one.
    assert simulate(problem, build_program(problem, loaded)).peak == loaded.predicted_peak
    _count("schedule", kind, "loaded")


@pytest.mark.parametrize("edit", ["predicted_peak", "recompute slot"])
def test_loaded_schedule_peak_is_checked(base_files, edit):
    problem, _, original = base_files[0]
    data = copy.deepcopy(original)
    assert data["recompute"], "the fixture's schedule recomputes something"
    if edit == "predicted_peak":
        data["predicted_peak"] -= 1
    else:
        data["recompute"][0][1] = 0  # the first backward slot
    try:
        loaded = Schedule.from_json(data, problem)
    except ProblemFileError:
        return  # refused at load: the fix
    assert simulate(problem, build_program(problem, loaded)).peak == loaded.predicted_peak


def _schedule_json() -> tuple[Problem, dict]:
    problem = random_problem(8, 0)
    return problem, keep_all(problem).to_json()


def test_problem_huge_time_is_a_problem_file_error():
    data = random_problem(8, 0).to_json()
    data["nodes"][3]["time"] = HUGE
    with pytest.raises(ProblemFileError):
        Problem.from_json(data)


@pytest.mark.parametrize("field", ["predicted_overhead", "bound", "solve_seconds"])
def test_schedule_huge_number_is_a_problem_file_error(field):
    problem, data = _schedule_json()
    data[field] = HUGE
    with pytest.raises(ProblemFileError):
        Schedule.from_json(data, problem)


@pytest.mark.parametrize("value", [None, [], {}, "x"])
def test_schedule_bad_solve_seconds_is_a_problem_file_error(value):
    problem, data = _schedule_json()
    data["solve_seconds"] = value
    try:
        Schedule.from_json(data, problem)
    except ProblemFileError:
        return
    # Not a ProblemFileError: either it loaded (a defect too) or raised something else.
    pytest.fail("Schedule.from_json accepted a non-numeric solve_seconds")


LARGEST_TOTAL = 2**53
"""Beyond this many bytes in one step (8 PiB) the CP-SAT model's integers overflow."""


def _unheld_alias(problem: Problem) -> str | None:
    """A node referencing a storage it neither allocates nor reads through an input."""
    for i, n in enumerate(problem.nodes):
        held = {s for j in n.inputs for s in problem.nodes[j].storages}
        for s in set(n.storages) - set(n.allocates) - held:
            return f"nodes[{i}] aliases storage {s} that none of its inputs holds"
    return None


def _too_large(problem: Problem) -> bool:
    workspace = max((n.workspace for n in problem.nodes), default=0)
    return sum(problem.storage_bytes) + workspace > LARGEST_TOTAL


@SETTINGS
@given(seed=st.integers(0, 3), data=st.data())
def test_problems_that_load_can_be_solved(base_files, seed, data):
    """Whatever ``Problem.from_json`` accepts, the solver handles: a schedule or
    InfeasibleBudgetError (the mutated file is re-hashed, so validation is what stops it)."""
    _, original, _ = base_files[seed]
    kind, _, _, mutated = _mutate(original, data.draw)
    _rehash(mutated)
    try:
        problem = Problem.from_json(mutated)
    except ProblemFileError:
        _count("loaded problem", kind, "ProblemFileError")
        return
    assume(not _too_large(problem) and _unheld_alias(problem) is None)
    baseline = keep_all(problem)
    budget = baseline.predicted_peak * 7 // 10
    try:
        schedule = solve(problem, budget, time_limit=1)
    except InfeasibleBudgetError as error:
        _count("loaded problem", kind, "solve: infeasible")
        assert error.minimum is not None and error.minimum > budget
        return
    _count("loaded problem", kind, "solve: " + schedule.status)
    assert simulate(problem, build_program(problem, schedule)).peak <= budget


def _solve_edited(edit) -> None:
    data = random_problem(8, 0).to_json()
    edit(data)
    assert _rehash(data)
    try:
        problem = Problem.from_json(data)
    except ProblemFileError:
        return  # the fix at load time
    try:
        solve(problem, keep_all(problem).predicted_peak * 7 // 10, time_limit=1)
    except InfeasibleBudgetError:
        pass


@pytest.mark.parametrize("size", [2**62, 2**63, HUGE], ids=["2**62", "2**63", "10**400"])
def test_oversized_storage_is_refused_at_load(size):
    def edit(data):
        data["storage_bytes"][5] = size

    _solve_edited(edit)


def test_oversized_workspace_is_refused_at_load():
    def edit(data):
        data["nodes"][5]["workspace"] = 2**63

    _solve_edited(edit)


def test_view_without_its_base_is_refused_at_load():
    def edit(data):
        view = next(n for n in data["nodes"] if n["op"] == "view")
        view["inputs"] = []

    _solve_edited(edit)


# ------------------------------------------------- the solver on random DAGs

@settings(SETTINGS, max_examples=150)
@given(
    forward_ops=st.integers(3, 25),
    seed=st.integers(0, 2**31),
    views=st.floats(0, 0.5),
    randoms=st.floats(0, 0.5),
    workspaces=st.floats(0, 0.5),
    # The requested range, and half the draws near where schedules become feasible.
    permille=st.one_of(st.integers(300, 1100), st.integers(650, 1000)),
)
def test_solved_schedules_fit_and_infeasible_budgets_name_a_feasible_minimum(
    forward_ops, seed, views, randoms, workspaces, permille
):
    problem = random_problem(forward_ops, seed, views, randoms, workspaces)
    budget = keep_all(problem).predicted_peak * permille // 1000
    try:
        schedule = solve(problem, budget, time_limit=2)
    except InfeasibleBudgetError as error:
        _count("solve", "infeasible", "proven" if error.proven else "not proven")
        assert error.budget == budget
        assert error.minimum is not None and error.minimum > budget
        # The budget the error names is one the solver then meets.
        at_minimum = solve(problem, error.minimum, time_limit=2)
        assert simulate(problem, build_program(problem, at_minimum)).peak <= error.minimum
        return
    _count("solve", "solved", schedule.status, schedule.backend)
    peak = simulate(problem, build_program(problem, schedule)).peak
    assert peak <= budget
    assert peak == schedule.predicted_peak
