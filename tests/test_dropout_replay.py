"""Dropout's mask recomputed from the generator's saved state: eager's random numbers."""

from __future__ import annotations

import copy
import tempfile

import torch
from conftest import small_vit, step_with_loss

import monet
from monet.capture import _replayed_bernoulli
from monet.solver import minimum_budget


def test_a_replayed_draw_is_the_first_and_leaves_the_generator_where_it_was():
    like = torch.empty(3, 257)
    torch.manual_seed(5)
    state = torch.ops.monet.rng_state(like.device)
    first = _replayed_bernoulli(like, 0.7, state)  # the forward: the generator was at state
    eager = torch.empty(3, 257).bernoulli_(0.7, generator=torch.Generator().set_state(state))
    assert torch.equal(first, eager)  # dropout's own draw: empty_like(x).bernoulli_(keep)
    following = torch.get_rng_state()
    torch.rand(11)  # other draws in between, as a step's later dropouts make
    before = torch.get_rng_state()
    again = _replayed_bernoulli(like, 0.7, state)  # a recomputation
    assert torch.equal(again, first)
    assert torch.equal(torch.get_rng_state(), before)
    assert not torch.equal(following, state)


def test_masks_recomputed_at_the_least_peak_give_eager_s_step_and_random_stream():
    """A ViT with dropout at its least peak recomputes most masks from the saved states
    (13 states of 5 KB kept instead of the masks): outputs and gradients are eager's,
    and so are the random numbers drawn after the step, step after step."""
    torch.manual_seed(0)
    model = small_vit().train()
    x = torch.randn(16, 3, 32, 32)
    problem = monet.optimize(copy.deepcopy(model), 1.0, (x,), measure=False,
                             variants=False).last_plan.problem
    draws = [n for n in problem.nodes if n.op == "monet.replayed_bernoulli.default"]
    states = [n for n in problem.nodes if n.op == "monet.rng_state.default"]
    assert draws and len(states) == len(draws)
    assert all(n.recomputable for n in draws) and not any(n.recomputable for n in states)
    least, _ = minimum_budget(problem, time_limit=5)
    redone = {problem.nodes[a].name for a, _ in least.recompute}
    assert sum(n.name in redone for n in draws) >= len(draws) // 2

    with tempfile.TemporaryDirectory() as directory:
        path = f"{directory}/least.json"
        least.save(path)
        reference = copy.deepcopy(model)
        optimized = monet.optimize(model, least.predicted_peak, (x,), schedule=path,
                                   measure=False, variants=False)
        for seed in (1, 2):
            for m in (model, reference):
                m.zero_grad(set_to_none=True)
            out = step_with_loss(optimized, x, seed)
            after = torch.rand(5)  # the generator after forward and backward
            expected = step_with_loss(reference, x, seed)
            assert torch.equal(out, expected)
            assert torch.equal(torch.rand(5), after)
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                assert torch.equal(p.grad, q.grad), name
