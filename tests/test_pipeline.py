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
from conftest import MODELS

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


def _step(module, x, seed: int):
    torch.manual_seed(seed)
    out = module(x)
    (out.float().square().mean() + out.sum()).backward()
    return out.detach()


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
        assert report.recomputed == 0

    out = _step(optimized, x, seed=1)
    grad_x = x.grad.clone()
    x.grad = None
    expected = _step(reference, x, seed=1)
    close = {"rtol": 1e-5, "atol": 1e-7}
    torch.testing.assert_close(out, expected, **close)
    torch.testing.assert_close(grad_x, x.grad, **close)
    for (param_name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **close, msg=param_name)
    for (buffer_name, b), c in zip(model.named_buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, **close, msg=buffer_name)


def test_lower_budgets_recompute_more():
    model, _, x = _setup("vit")
    high = monet.optimize(model, 0.8, (x,), measure=False, time_limit=5).last_plan.schedule
    low = monet.optimize(model, 0.55, (x,), measure=False, time_limit=5).last_plan.schedule
    assert low.predicted_peak < high.predicted_peak
    assert low.predicted_overhead >= high.predicted_overhead
