"""monet.optimize against eager PyTorch on a ViT and a ConvNet, at several budgets.

For each model and budget: outputs, input and parameter gradients and
batch-norm running statistics equal eager's on the same seed (dropout active);
the measured peak is within the budget and within 5% of the predicted one; the
simulated peak of the lowered graphs equals the solver's prediction.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, assert_same_step

import monet
from monet.solver import minimum_budget

BUDGETS = [1.0, 0.7, 0.5, "smallest"]
_SMALLEST: dict[str, tuple[int, str]] = {}


def _setup(name: str):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    x = torch.randn(*shape, requires_grad=True)
    return model, reference, x


def _smallest_budget(name: str, directory) -> tuple[int, str]:
    """The least budget the solver finds, and its schedule saved as a file."""
    if name not in _SMALLEST:
        model, _, x = _setup(name)
        plan = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan
        schedule, _ = minimum_budget(plan.problem, time_limit=10)
        path = str(directory / f"{name}-smallest.json")
        schedule.save(path)
        _SMALLEST[name] = (schedule.predicted_peak, path)
    return _SMALLEST[name]


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("budget", BUDGETS, ids=str)
def test_matches_eager_within_budget(name, budget, tmp_path_factory):
    schedule = None
    if budget == "smallest":
        # Run the least-peak schedule found from its file: CP-SAT's search is not
        # deterministic within a time limit, the file is.
        budget, schedule = _smallest_budget(name, tmp_path_factory.mktemp("schedules"))
    model, reference, x = _setup(name)
    optimized = monet.optimize(
        model, budget, (x,), time_limit=10, timing_repeats=0, schedule=schedule
    )
    report = optimized.report()
    plan = optimized.last_plan

    assert report.measured_peak <= report.budget
    assert plan.simulation.peak == plan.schedule.predicted_peak
    assert abs(report.measured_peak - report.predicted_peak) <= 0.05 * report.predicted_peak
    if budget == 1.0:
        # Keeping everything fits: the plan adds no time (a faster kernel may even
        # pay for a cheap recomputation).
        assert report.predicted_overhead_seconds <= 1e-12
        if not report.variants:
            assert report.recomputed == 0

    # Operator variants (a norm's backward from its output, another kernel) round
    # differently; without them the step is eager's arithmetic.
    close = {"rtol": 1e-4, "atol": 1e-6} if report.variants else {"rtol": 1e-5, "atol": 1e-7}
    assert_same_step(optimized, model, reference, x, close)


def test_lower_budgets_recompute_more():
    model, _, x = _setup("vit")
    high = monet.optimize(model, 0.8, (x,), measure=False, time_limit=5).last_plan.schedule
    low = monet.optimize(model, 0.55, (x,), measure=False, time_limit=5).last_plan.schedule
    assert low.predicted_peak < high.predicted_peak
    assert low.predicted_overhead >= high.predicted_overhead
