"""monet.optimize as a user meets it: budgets, errors, modes, plans per signature, state."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import monet
from monet import CaptureError, InfeasibleBudgetError, parse_budget


@pytest.mark.parametrize(
    "budget, expected",
    [
        (1024, ("bytes", 1024.0)),
        ("6GiB", ("bytes", 6.0 * 2**30)),
        ("512MB", ("bytes", 512e6)),
        ("300 MiB", ("bytes", 300.0 * 2**20)),
        ("1.5kib", ("bytes", 1536.0)),
        (0.5, ("fraction", 0.5)),
        (1.0, ("fraction", 1.0)),
    ],
)
def test_budget_forms(budget, expected):
    assert parse_budget(budget) == expected


@pytest.mark.parametrize(
    "budget", ["6 parsecs", -1, 0, math.nan, 2.0, -0.5, "", "GiB", True, None, [1], "0B"]
)
def test_malformed_budgets_raise_value_error(budget):
    with pytest.raises(ValueError, match="budget"):
        parse_budget(budget)
    with pytest.raises(ValueError):
        monet.optimize(nn.Linear(2, 2), budget)


class TwoInputs(nn.Module):
    """Two inputs (one without grad), a dict and tuple output, dropout and batch-norm."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(8, 16)
        self.norm = nn.BatchNorm1d(16)
        self.dropout = nn.Dropout(0.3)
        self.out = nn.Linear(16, 4)

    def forward(self, x, mask):
        h = self.dropout(torch.relu(self.norm(self.linear(x)))) * mask
        return {"logits": self.out(h), "extra": (h.mean(), mask.sum())}


def _loss(out):
    return out["logits"].square().sum() + out["extra"][0]


def test_pytree_inputs_and_outputs_match_eager():
    torch.manual_seed(0)
    model = TwoInputs()
    reference = copy.deepcopy(model)
    x = torch.randn(32, 8, requires_grad=True)
    mask = torch.ones(32, 16)
    optimized = monet.optimize(model, 1.0, (x, mask), measure=False)
    torch.manual_seed(3)
    out = optimized(x, mask)
    _loss(out).backward()
    grad = x.grad.clone()
    x.grad = None
    torch.manual_seed(3)
    expected = reference(x, mask)
    _loss(expected).backward()
    torch.testing.assert_close(out["logits"], expected["logits"])
    torch.testing.assert_close(out["extra"][1], expected["extra"][1])
    torch.testing.assert_close(grad, x.grad)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    assert model.norm.num_batches_tracked == reference.norm.num_batches_tracked


def test_impossible_budget_names_the_smallest():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64))
    x = torch.randn(128, 64)
    with pytest.raises(InfeasibleBudgetError, match="smallest budget found feasible is") as error:
        monet.optimize(model, 0.05, (x,), measure=False, time_limit=5)
    minimum = error.value.minimum
    assert minimum is not None and minimum > error.value.budget
    # The budget it names works.
    optimized = monet.optimize(model, minimum, (x,), measure=False, time_limit=5)
    assert optimized.report().predicted_peak <= minimum


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if y.sum() > 0:  # data-dependent control flow: cannot be traced
            return y * 2
        return y


def test_untraceable_model_names_the_line():
    with pytest.raises(CaptureError) as error:
        monet.optimize(DataDependent(), 1.0, (torch.randn(2, 4),), measure=False)
    message = str(error.value)
    assert "test_api.py" in message
    assert "if y.sum() > 0" in message


def test_a_planning_failure_is_not_reported_as_a_capture_failure(monkeypatch):
    """Once the graph is captured, what planning raises reaches the caller as it is."""

    def fails(*args, **kwargs):
        raise ValueError("planning failed")

    monkeypatch.setattr("monet.runtime.analyse", fails)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match="^planning failed$") as error:
        monet.optimize(model, 1.0, (torch.randn(2, 4),), measure=False)
    assert not isinstance(error.value, CaptureError)


def test_eval_and_no_grad_run_the_model_without_a_plan():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    optimized = monet.optimize(model, "1MiB", measure=False)
    x = torch.randn(3, 4)
    optimized.eval()
    torch.testing.assert_close(optimized(x), model(x))
    optimized.train()
    with torch.no_grad():
        optimized(x)
    assert optimized.plans == {}


def test_new_shapes_get_their_own_plan_and_same_shapes_reuse_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    optimized = monet.optimize(model, 1.0, measure=False)
    for batch in (3, 5, 3):
        optimized(torch.randn(batch, 4)).sum().backward()
    assert len(optimized.plans) == 2
    optimized(torch.randn(3, 4, dtype=torch.float64).float()).sum().backward()
    assert len(optimized.plans) == 2
    model.double()
    optimized(torch.randn(3, 4, dtype=torch.float64)).sum().backward()
    assert len(optimized.plans) == 3


def test_parameters_and_state_stay_the_users():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    optimized = monet.optimize(model, 1.0, (torch.randn(6, 4),), measure=False)
    assert list(optimized.parameters()) == list(model.parameters())
    assert optimized.state_dict().keys() == model.state_dict().keys()
    optimizer = torch.optim.SGD(optimized.parameters(), lr=0.1)
    before = model[0].weight.detach().clone()
    optimized(torch.randn(6, 4)).sum().backward()
    optimizer.step()
    assert not torch.equal(before, model[0].weight)
    fresh = copy.deepcopy(model)
    optimized.load_state_dict(fresh.state_dict())
    assert torch.equal(model[0].weight, fresh[0].weight)


def test_report_as_text_and_dict():
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
                            for _ in range(6)))
    optimized = monet.optimize(model, 0.8, (torch.randn(256, 32),), timing_repeats=2)
    report = optimized.report()
    data = report.as_dict()
    for key in ("eager_peak", "budget", "predicted_peak", "measured_peak", "overhead",
                "solve_seconds", "measurement_method"):
        assert data[key] is not None, key
    assert data["measured_peak"] <= data["budget"]
    text = str(report)
    assert "measured peak" in text and "torch.profiler" in text


def test_second_optimize_uses_the_profile_cache(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(32, 16)
    cache = str(tmp_path / "profile.json")
    first = monet.optimize(model, 1.0, (x,), measure=False, profile_cache=cache)
    assert first.last_plan.problem.meta["profiled_ops"] > 0
    second = monet.optimize(model, 1.0, (x,), measure=False, profile_cache=cache)
    assert second.last_plan.problem.meta["profiled_ops"] == 0
    assert second.last_plan.problem.meta["cached_ops"] == first.last_plan.problem.meta[
        "profiled_ops"
    ]


def test_times_measured_on_a_busy_machine_are_not_cached(tmp_path, monkeypatch):
    """Other processes on the CPUs inflate every time measured; the problem uses them, the
    cache does not keep them, and the next profile on an idle machine measures anew."""
    import os

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    x = torch.randn(32, 16)
    cache = tmp_path / "profile.json"
    cores = os.cpu_count() or 1
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * cores, 0.0, 0.0))
    with pytest.warns(UserWarning, match="busy while profiling"):
        busy = monet.optimize(model, 1.0, (x,), measure=False, profile_cache=str(cache))
    assert busy.last_plan.problem.meta["profiled_ops"] > 0
    assert not cache.exists()
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    idle = monet.optimize(model, 1.0, (x,), measure=False, profile_cache=str(cache))
    assert idle.last_plan.problem.meta["profiled_ops"] == busy.last_plan.problem.meta[
        "profiled_ops"]
    assert cache.exists()


def test_a_corrupt_profile_cache_is_rebuilt(tmp_path):
    cache = tmp_path / "profile.json"
    cache.write_text('{"version": 1, "entries": {"x": [1.0')
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.warns(UserWarning, match="ignoring the profile cache"):
        optimized = monet.optimize(
            model, 1.0, (torch.randn(2, 4),), measure=False, profile_cache=str(cache)
        )
    assert optimized.last_plan.problem.meta["profiled_ops"] > 0
    assert '"version":1' in cache.read_text().replace(" ", "")


def test_a_measured_peak_over_the_budget_is_replanned_below_it(monkeypatch):
    """If the device allocates more than the model of memory predicts, optimize plans
    again with the excess taken off, so the measured peak still fits the budget."""
    from monet.runtime import MonetModule

    real_measure = MonetModule._measure
    calls = []

    def measure_with_an_unseen_allocation(self, plan, args, kwargs):
        real_measure(self, plan, args, kwargs)
        calls.append(plan.schedule.predicted_peak)
        if len(calls) == 1:  # 20 kB the simulator did not see, over the budget
            plan.measured_peak = plan.problem.budget + 20_000
    monkeypatch.setattr(MonetModule, "_measure", measure_with_an_unseen_allocation)

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
                            for _ in range(6)))
    x = torch.randn(256, 32)
    optimized = monet.optimize(model, 0.8, (x,), timing_repeats=0, time_limit=5)
    report = optimized.report()
    assert len(calls) == 2
    # Re-planned with the whole excess over the prediction taken off the budget.
    assert calls[1] <= calls[0] - 20_000
    assert report.measured_peak <= report.budget


def test_a_fraction_is_of_the_plan_closest_to_eager_for_a_reversible_model():
    """A reversible RevViT's keep-everything plan holds every reconstruction its eager
    backward makes, far above eager's peak. The plan closest to eager recomputes them
    at no added time, so a budget of 1.0 is eager's measured peak, and fits."""
    import monet.models
    from monet.solver import eager_like, keep_all

    torch.manual_seed(0)
    model = monet.models.create("revvit_tiny_test")
    inputs = monet.models.example_inputs("revvit_tiny_test", batch=64)
    optimized = monet.optimize(model, 1.0, inputs, time_limit=5, timing_repeats=0)
    report = optimized.report()
    problem = optimized.last_plan.problem
    assert keep_all(problem).predicted_peak > report.eager_peak
    assert eager_like(problem).predicted_peak <= report.eager_peak
    assert eager_like(problem).predicted_overhead == 0
    assert report.budget == report.eager_peak
    assert report.measured_peak <= report.eager_peak
