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
    # differently; without them the step is eager's arithmetic. Rebuilding several
    # batch norms' inputs moves the stem's weight gradient (up to ~3) by up to 2e-6
    # near zero: the tolerance of tests/test_variants_pipeline.py.
    close = {"rtol": 1e-4, "atol": 1e-5} if report.variants else {"rtol": 1e-5, "atol": 1e-7}
    assert_same_step(optimized, model, reference, x, close)


def test_lower_budgets_recompute_more():
    model, _, x = _setup("vit")
    high = monet.optimize(model, 0.8, (x,), measure=False, time_limit=5).last_plan.schedule
    low = monet.optimize(model, 0.55, (x,), measure=False, time_limit=5).last_plan.schedule
    assert low.predicted_peak < high.predicted_peak
    assert low.predicted_overhead >= high.predicted_overhead


class _Attention(torch.nn.Module):
    def __init__(self, dropout: float):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.dropout = dropout

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout)
        return out.sum()


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_attention_and_its_dropout_may_be_recomputed(dropout):
    """Attention kernels carry the seeded tag for their optional dropout: only with
    dropout do they draw random numbers. Without, the kernel may be recomputed; with
    (on CPU the math path, its dropout decomposed), the generator's state read before
    the draw is kept and the draw replayed from it."""
    from monet.capture import capture
    from monet.graph import analyse

    joint = capture(_Attention(dropout), torch.randn(2, 5, 8, requires_grad=True))
    problem = analyse(joint, variants=False).problem
    forward = [n for n in problem.nodes if n.phase == "forward"]
    kernels = [n for n in forward if "scaled_dot_product" in n.op]
    draws = [n for n in forward if "bernoulli" in n.op]
    states = [n for n in forward if n.op == "monet.rng_state.default"]
    assert all(n.recomputable for n in kernels + draws)
    assert not any(n.recomputable for n in states)
    assert (len(kernels), len(draws), len(states)) == ((1, 0, 0) if dropout == 0.0 else (0, 1, 1))


def test_recomputed_attention_matches_eager(tmp_path):
    from monet.solver import Schedule
    from monet.solver.heuristic import _useful, evaluate
    from monet.solver.ilp import analyse

    torch.manual_seed(0)
    full = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), _Attention(0.0))
    reference = copy.deepcopy(full)
    x = torch.randn(3, 7, 8, requires_grad=True)
    problem = monet.optimize(full, 1.0, (x,), measure=False, time_limit=2,
                             variants=False).last_plan.problem
    # Recompute everything that may be: the attention kernel included.
    structure = analyse(problem)
    candidate = evaluate(problem, structure, _useful(structure, structure.recomputable))
    assert any("scaled_dot_product" in problem.nodes[a].op for a, _ in candidate.recompute)
    path = tmp_path / "schedule.json"
    Schedule(problem.graph_hash, candidate.peak, candidate.kept, candidate.recompute,
             candidate.peak, candidate.overhead, "heuristic").save(path)
    optimized = monet.optimize(full, candidate.peak, (x,), measure=False, variants=False,
                               schedule=str(path))
    assert_same_step(optimized, full, reference, x, {"rtol": 1e-5, "atol": 1e-7})
