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


def _assert_trains_like_eager(optimized, model, reference, inputs, rtol, atol):
    """One step of each on the same seed: outputs as eager's, gradients within
    ``rtol``/``atol``, buffers equal."""
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
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=param)
    for b, c in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c)


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

    _assert_trains_like_eager(optimized, model, reference, inputs, rtol=1e-5, atol=1e-6)


MLP_MODELS = [n for n in monet.models.names(tiny=True) if not n.startswith("resnet")]


@pytest.mark.parametrize("name", MLP_MODELS)
def test_zoo_model_with_every_mlp_chunked(name, tmp_path):
    """Every MLP of the model on ``mlp.backward_chunked``, from a schedule file: the
    step trains as eager does, up to the rounding of products over chunks of rows.
    A reversible model runs as its plain twin: in its reversible capture the backward's
    reads of its MLPs belong to the ``reversible.keep`` choice."""
    torch.manual_seed(0)
    reversible = "reversible" in monet.models.registry.spec(name).tags
    model = monet.models.create(name, **({"reversible": False} if reversible else {}))
    inputs = monet.models.example_inputs(name)
    problem = monet.optimize(model, 1.0, inputs, measure=False).last_plan.problem
    variants = tuple(
        next((k for k, a in enumerate(c.alternatives) if a.name == "mlp.backward_chunked"), 0)
        for c in problem.choices
    )
    assert any(variants)
    schedule = keep_all(problem, variants)
    schedule.save(tmp_path / "mlp.json")
    reference = copy.deepcopy(model)
    optimized = monet.optimize(model, schedule.predicted_peak, inputs, measure=False,
                               schedule=str(tmp_path / "mlp.json"))
    assert set(optimized.report().variants.values()) == {"mlp.backward_chunked"}

    # A product over chunks of rows rounds differently: float32 tolerance for gradients.
    _assert_trains_like_eager(optimized, model, reference, inputs, rtol=1e-4, atol=1e-5)
