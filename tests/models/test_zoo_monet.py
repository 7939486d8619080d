"""Every model of the zoo (tiny configs) through monet: captured by monet's capture stage
into one joint graph, planned below its keep-everything peak, and trained with the
same outputs, gradients and buffers as eager PyTorch (dropout and drop-path active)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._pytree import tree_leaves

import monet
import monet.models
from monet.capture import capture
from monet.graph import analyse
from monet.solver import keep_all, minimum_budget


def _loss(out) -> torch.Tensor:
    return sum(t.float().square().mean() for t in tree_leaves(out) if t.is_floating_point())


@pytest.mark.parametrize("name", monet.models.names(tiny=True))
def test_zoo_model_through_monet(name):
    torch.manual_seed(0)
    model = monet.models.create(name)
    inputs = monet.models.example_inputs(name)
    joint = capture(model, *inputs)
    problem = analyse(joint).problem
    assert sum(n.phase == "backward" for n in problem.nodes) > 0
    assert sum(n.phase == "forward" for n in problem.nodes) > 0

    # A budget between the least peak found and keeping everything forces recomputation.
    profiled = monet.optimize(model, 1.0, inputs, measure=False).last_plan.problem
    low = minimum_budget(profiled, time_limit=5)[0].budget
    high = keep_all(profiled).predicted_peak
    budget = (low + high) // 2
    reference = copy.deepcopy(model)
    optimized = monet.optimize(model, budget, inputs, time_limit=10, timing_repeats=0)
    report = optimized.report()
    assert report.measured_peak <= budget
    assert optimized.last_plan.simulation.peak == report.predicted_peak

    torch.manual_seed(1)
    out = optimized(*inputs)
    _loss(out).backward()
    torch.manual_seed(1)
    expected = reference(*inputs)
    _loss(expected).backward()
    for a, b in zip(tree_leaves(out), tree_leaves(expected)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for (param, p), q in zip(model.named_parameters(), reference.parameters()):
        if q.grad is None:
            assert p.grad is None, param
        else:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=param)
    for b, c in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c)
