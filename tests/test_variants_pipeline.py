"""Operator variants through the whole pipeline: chosen, lowered, run, equal to eager."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MODELS, assert_same_step, step_with_loss

import monet
from monet.solver import keep_all
from monet.solver.random_graphs import random_problem

aten = torch.ops.aten


def _setup(name: str):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    return model, copy.deepcopy(model), torch.randn(*shape, requires_grad=True)


NORM = {"vit": "layer_norm.backward_from_output", "convnet": "batch_norm.backward_from_output"}


MLP = "mlp.backward_chunked"
KINDS = [(name, kind) for name in sorted(MODELS) for kind in ("norm", "convolution.native")]
KINDS.append(("vit", MLP))  # the ConvNet has no MLP
KINDS += [("convnet", "max_pool.backward_from_indices"),
          ("convnet", "batch_norm.backward_in_place"),
          ("convnet", "batch_norm.backward_from_output_in_place"),
          ("vit", "layer_norm.backward_in_place"),
          ("vit", "layer_norm.backward_from_output_in_place"),
          ("vit", "layer_norm.backward_recomputed_stats")]


@pytest.mark.parametrize("name,kind", KINDS)
def test_every_site_runs_its_variant_and_matches_eager(name, kind, tmp_path, monkeypatch):
    # Offered whatever their measured time (a kernel no faster than the captured one is
    # left out, and on a busy machine that turns on timing noise): correctness is tested.
    monkeypatch.setattr("monet.profile._worth_offering", lambda node, override: True)
    model, reference, x = _setup(name)
    # Forward kernels only where no discrete op downstream (a max-pool's argmax) can
    # turn their rounding into a different choice: the ViT.
    kernels = name == "vit"
    plan = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5,
                          kernel_variants=kernels).last_plan
    problem = plan.problem
    variant = NORM[name] if kind == "norm" else kind
    # Every site of this kind runs its variant, everything else is kept: a schedule file.
    variants = tuple(
        next((k for k, a in enumerate(c.alternatives) if a.name == variant), 0)
        for c in problem.choices
    )
    assert any(variants)
    schedule = keep_all(problem, variants)
    path = tmp_path / "variants.json"
    schedule.save(path)

    model, reference, x = _setup(name)
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0, kernel_variants=kernels)
    report = optimized.report()
    assert len(report.variants) == sum(map(bool, variants))
    assert report.variant_sites == len(problem.choices)
    assert set(report.variants.values()) == {variant} and variant in str(report)
    assert optimized.last_plan.simulation.peak == schedule.predicted_peak
    assert report.measured_peak <= schedule.predicted_peak * 1.05

    # Another kernel, a norm rebuilding its input, a product over chunks of rows: float32
    # rounding, not bit equality (gradients here reach 10, so elements near 0 may move ~1e-6).
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


def test_norm_from_output_lowers_the_floor_for_free():
    """On the ViT, reading the norms' outputs drops their inputs at no recomputation."""
    model, _, x = _setup("vit")
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    norms = tuple(
        int(c.alternatives[1].name == "layer_norm.backward_from_output") for c in problem.choices
    )
    assert any(norms)
    assert keep_all(problem, norms).predicted_peak < keep_all(problem).predicted_peak
    # By default no variant changes a forward value (only kernel_variants=True does).
    touched = {o.node for c in problem.choices for a in c.alternatives for o in a.overrides}
    assert {problem.nodes[i].phase for i in touched} == {"backward"}


def test_mlp_recomputing_its_hidden_lowers_the_floor():
    """The MLP's backward no longer reads its wide hidden values nor makes full-width
    gradients: keeping everything else, the step's peak drops by a third or more."""
    model, _, x = _setup("vit")
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    def leanest(choice) -> int:  # ``CHUNKS`` chunks, offered as ``_fine`` on small MLPs
        names = [a.name for a in choice.alternatives]
        return next((names.index(n) for n in (MLP + "_fine", MLP) if n in names), 0)

    mlps = tuple(leanest(c) for c in problem.choices)
    assert any(mlps)
    assert keep_all(problem, mlps).predicted_peak < 0.9 * keep_all(problem).predicted_peak


def _fused_step_is_the_captured_one(model, x, fuse) -> int:
    """The joint graph's results before and after ``fuse(module)`` (on the same random
    draws) are equal bit for bit; returns what ``fuse`` returned (how many it fused)."""
    from torch.utils import _pytree as pytree

    from monet.capture import capture

    joint = capture(model, x)
    primals = list(joint.real_primals)
    tangents = [torch.randn(n.meta["val"].shape, generator=torch.Generator().manual_seed(k))
                for k, n in enumerate(joint.module.graph.find_nodes(op="placeholder"))
                if n.name.startswith("tangents")]
    with torch.no_grad():
        torch.manual_seed(0)  # the same dropout masks and drop-path draws
        before = pytree.tree_leaves(joint.module(primals, tangents))
        fused = fuse(joint.module)
        torch.manual_seed(0)
        after = pytree.tree_leaves(joint.module(primals, tangents))
    assert len(before) == len(after)
    for a, b in zip(before, after, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    return fused


def test_fused_mlp_backward_is_the_captured_step():
    """Fusing each MLP's backward into one node runs the same ops: bit for bit."""
    from monet.operators.mlp import fuse_mlp_backwards

    model, _, x = _setup("vit")
    assert _fused_step_is_the_captured_one(model, x, fuse_mlp_backwards) > 0


def test_the_mlp_backward_keeps_the_captured_peak_and_reads_x_last(tmp_path):
    """Only fc1's gradients are fused (the one node that reads fc1's input ``x`` in the
    backward); the ops before stay as captured, so keeping everything the joint
    problem's peak is the captured graph's, predicted and measured, and a schedule
    may bring ``x`` back just before fc1's weight gradient as it may unfused."""
    peaks = {}
    for variants in (False, True):
        model, _, x = _setup("vit")
        problem = monet.optimize(model, 1.0, (x,), variants=variants, measure=False,
                                 time_limit=2).last_plan.problem
        peaks[variants] = keep_all(problem)
    assert peaks[True].predicted_peak == peaks[False].predicted_peak
    fused = [i for i, n in enumerate(problem.nodes) if n.op == "mlp_backward"]
    assert fused
    for i in fused:
        forward = [r for r in problem.nodes[i].inputs if problem.nodes[r].phase == "forward"]
        assert forward  # x and fc1's weight, transposed
        for r in forward:
            assert [k for k, n in enumerate(problem.nodes)
                    if n.phase == "backward" and r in n.inputs] == [i]

    path = tmp_path / "keep.json"
    peaks[True].save(path)
    model, _, x = _setup("vit")
    optimized = monet.optimize(model, peaks[True].predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    assert optimized.last_plan.measured_peak == peaks[True].predicted_peak


class _ParallelMlps(torch.nn.Module):
    """Two MLPs, summed: both are handed the same output gradient."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        nn = torch.nn
        self.a = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.b = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.a(x) + self.b(x.flip(-1)))


class _MlpOut(torch.nn.Module):
    """An MLP whose output is the step's: its output gradient is the tangent itself."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        nn = torch.nn
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + x


@pytest.mark.parametrize("build,fused", [(_ParallelMlps, 2), (_MlpOut, 1)])
@pytest.mark.parametrize("variant", ["default", MLP])
def test_mlps_handed_one_gradient_or_a_tangent_run_as_planned(build, fused, variant, tmp_path):
    """Two MLPs handed the same output gradient, and an MLP handed the tangent itself
    (held by autograd): keeping everything, with the captured backward or the chunked
    one (which reads that gradient in place of ``a``'s), the measured peak is the
    predicted one and the step is eager's."""
    torch.manual_seed(0)
    model = build()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 17, 16, requires_grad=True)
    problem = monet.optimize(copy.deepcopy(model), 1.0, (x,), measure=False,
                             time_limit=2).last_plan.problem
    assert sum(n.op == "mlp_backward" for n in problem.nodes) == fused
    picked = tuple(next((k for k, a in enumerate(c.alternatives) if a.name == variant), 0)
                   for c in problem.choices)
    assert sum(map(bool, picked)) == (0 if variant == "default" else fused)
    schedule = keep_all(problem, picked)
    path = tmp_path / "keep.json"
    schedule.save(path)
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    assert optimized.last_plan.measured_peak == schedule.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


class _TwoMlps(torch.nn.Module):
    """Pre-norm residual MLPs without dropout: GELU (tanh) with biases, SiLU without."""

    def __init__(self, width: int = 8, hidden: int = 32):
        super().__init__()
        nn = torch.nn
        self.norm = nn.LayerNorm(width)
        self.gelu = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"),
                                  nn.Linear(hidden, width))
        self.silu = nn.Sequential(nn.Linear(width, hidden, bias=False), nn.SiLU(),
                                  nn.Linear(hidden, width, bias=False))
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gelu(self.norm(x))
        return self.head(x + self.silu(x))


def test_chunked_mlp_forward_skips_the_wide_values_and_matches():
    """With ``mlp.chunked`` applied, fc2 computes the MLP from x a chunk at a time and
    fc1, the activation and their views hold empty tensors read by nothing else; the
    step is the captured one up to float rounding."""
    from torch.utils import _pytree as pytree

    from monet.capture import capture
    from monet.operators import apply_rewrites, find_sites
    from monet.operators.mlp import fuse_mlp_backwards

    torch.manual_seed(0)
    joint = capture(_TwoMlps(), torch.randn(2, 13, 8, requires_grad=True))
    module, graph = joint.module, joint.module.graph
    primals = list(joint.real_primals)
    tangents = [torch.randn(n.meta["val"].shape, generator=torch.Generator().manual_seed(k))
                for k, n in enumerate(graph.find_nodes(op="placeholder"))
                if n.name.startswith("tangents")]

    def step():
        return [t for t in pytree.tree_leaves(module(primals, tangents)) if t is not None]

    with torch.no_grad():
        before = step()
        assert fuse_mlp_backwards(module) == 2
        sites = find_sites(list(graph.nodes))
        alternatives = [a for site in sites for a in site.alternatives
                        if a.name.startswith("mlp.")]
        # No max or compare downstream: offered without kernel_variants.
        # Small MLPs: one chunk by size, and ``CHUNKS`` offered too (``_fine``).
        assert [a.name for a in alternatives] == [
            "mlp.backward_chunked", "mlp.chunked", "mlp.backward_chunked_fine",
            "mlp.chunked_fine"] * 2
        for alternative in (a for a in alternatives if a.name.startswith("mlp.chunked")):
            # fc1 and the activation never made; nor, in the backward, ``a``'s gradient.
            targets = [d.target for d in alternative.drops]
            assert len(targets) == 4 and targets[0] in (aten.addmm.default, aten.mm.default)
            assert targets[2] is aten.mm.default
            assert targets[3] in (aten.gelu_backward.default, aten.silu_backward.default)
        chunked = [a for a in alternatives if a.name == "mlp.chunked"]
        apply_rewrites(graph, [r for a in chunked for r in a.rewrites],
                       {n: n for n in graph.nodes})
        module.recompile()
        after = step()
    for a, b in zip(after, before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _MlpThenMax(_TwoMlps):
    """A max over tokens after the MLPs: its argmax could flip on fc2's rounding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.gelu(self.norm(x))
        return self.head((x + self.silu(x)).amax(dim=1))


@pytest.mark.parametrize("kernel_variants", [False, True])
def test_chunked_forward_waits_for_kernel_variants_before_a_discrete_op(kernel_variants):
    torch.manual_seed(0)
    model, x = _MlpThenMax(16, 64), torch.randn(4, 33, 16, requires_grad=True)
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                             kernel_variants=kernel_variants).last_plan.problem
    names = [a.name for c in problem.choices for a in c.alternatives]
    assert names.count("mlp.backward_chunked") == 2
    assert names.count("mlp.chunked") == (2 if kernel_variants else 0)


def test_chunked_mlp_runs_end_to_end_below_the_backward_only_variant(tmp_path, monkeypatch):
    """``mlp.chunked`` through optimize: chosen from a schedule file, lowered, run; the
    step equals eager's, the measured peak is the simulated one, and keeping everything
    else it needs less than ``mlp.backward_chunked`` (no full-width value even in the
    forward)."""
    # This MLP's hidden values (4×33×64 floats) would run in one chunk by size.
    monkeypatch.setattr("monet.operators.mlp.CHUNK_BYTES", 1024)
    torch.manual_seed(0)
    model, x = _TwoMlps(16, 64), torch.randn(4, 33, 16, requires_grad=True)
    reference = copy.deepcopy(model)
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem

    def picking(name):
        return tuple(next((k for k, a in enumerate(c.alternatives) if a.name == name), 0)
                     for c in problem.choices)

    chunked, backward_only = picking("mlp.chunked"), picking(MLP)
    assert sum(map(bool, chunked)) == 2
    dropped = [s for c, k in enumerate(chunked) if k
               for s in problem.choices[c].alternatives[k].drops]
    # a and h of each MLP; in the backward, h's gradient and a's
    assert len(dropped) == 8
    schedule = keep_all(problem, chunked)
    assert schedule.predicted_peak < keep_all(problem, backward_only).predicted_peak
    path = tmp_path / "chunked.json"
    schedule.save(path)
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    report = optimized.report()
    assert set(report.variants.values()) == {"mlp.chunked"}
    assert report.measured_peak == schedule.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


def test_a_vit_with_dropout_zero_gets_the_chunked_mlp(tmp_path):
    """nn.Dropout(0.0) in training captures as a copy between the activation and fc2:
    the MLP is still matched, and mlp.chunked (skipping the copy too) runs end to end."""
    from monet.models import create

    torch.manual_seed(0)
    model = create("vit_tiny_test", image_size=32, depth=2, dropout=0.0)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 32, 32, requires_grad=True)
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2).last_plan.problem
    chunked = tuple(next((k for k, a in enumerate(c.alternatives) if a.name == "mlp.chunked"), 0)
                    for c in problem.choices)
    assert sum(map(bool, chunked)) == 2
    schedule = keep_all(problem, chunked)
    path = tmp_path / "chunked.json"
    schedule.save(path)
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    assert optimized.report().measured_peak == schedule.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


STORAGE = "storage.bfloat16"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_bfloat16_storage_is_opt_in_and_keeps_half(name, tmp_path):
    """Keeping activations in bfloat16 is lossy: never offered unless asked for. Asked
    for and picked everywhere, keeping everything else, each value it applies to is
    kept in half its bytes, and the peak is no higher; the step runs with the
    simulated peak, its outputs are eager's (the forward is unchanged), its gradients
    within bfloat16's rounding of eager's, and the report says lossy."""
    model, _, x = _setup(name)
    plain = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    assert not any(a.name == STORAGE for c in plain.choices for a in c.alternatives)
    model, _, x = _setup(name)
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5,
                             lossy_variants=True).last_plan.problem
    variants = tuple(next((k for k, a in enumerate(c.alternatives) if a.name == STORAGE), 0)
                     for c in problem.choices)
    assert any(variants)
    assert all(c.alternatives[k].lossy for c, k in zip(problem.choices, variants) if k)
    schedule, plain_schedule = keep_all(problem, variants), keep_all(problem)
    sizes = problem.storage_bytes
    saved = (sum(sizes[s] for s in plain_schedule.kept) - sum(sizes[s] for s in schedule.kept))
    copies = [s for s in schedule.kept if s not in plain_schedule.kept]
    assert len(copies) == sum(map(bool, variants))
    assert saved == sum(sizes[s] for s in copies) > 0  # each copy replaces twice its bytes
    assert schedule.predicted_peak <= plain_schedule.predicted_peak
    path = tmp_path / "bfloat16.json"
    schedule.save(path)

    model, reference, x = _setup(name)
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0, lossy_variants=True)
    report = optimized.report()
    assert set(report.variants.values()) == {STORAGE}
    assert set(report.lossy) == set(report.variants) and "(lossy)" in str(report)
    assert optimized.last_plan.simulation.peak == schedule.predicted_peak
    out = step_with_loss(optimized, x, seed=1)
    grad_x = x.grad.clone()
    x.grad = None
    expected = step_with_loss(reference, x, seed=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    pairs = [(grad_x, x.grad)] + [(p.grad, q.grad) for p, q in
                                  zip(model.parameters(), reference.parameters())]
    for actual, wanted in pairs:
        assert (actual - wanted).norm() <= 2e-2 * wanted.norm() + 1e-6
    for b, c in zip(model.buffers(), reference.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


def test_schedule_with_wrong_variants_is_refused(tmp_path):
    from monet.solver import ProblemFileError, Schedule

    problem = random_problem(8, seed=2)
    data = keep_all(problem).to_json()
    data["variants"] = [1]
    with pytest.raises(ProblemFileError, match="variants"):
        Schedule.from_json(data, problem)


def _tiny_resnet():
    from monet.models import create

    torch.manual_seed(0)
    model = create("resnet_tiny_test")
    # Images without a gradient, as in training: the stem's convolution then computes
    # no input gradient, and the batch norms' backwards hold the peak.
    return model, copy.deepcopy(model), torch.randn(8, 3, 64, 64)


def test_in_place_norm_backward_lowers_the_least_peak():
    """A batch-norm backward that writes its input's gradient over the incoming gradient
    (which dies there) never holds both: a ResNet's least peak drops, and the run's
    measured peak is the predicted one."""
    from dataclasses import replace

    from monet.solver import minimum_budget
    from monet.solver.problem import Choice, structure_hash

    model, _, x = _tiny_resnet()
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    in_place = {"batch_norm.backward_in_place", "batch_norm.backward_from_output_in_place"}
    assert in_place <= {a.name for c in problem.choices for a in c.alternatives}
    choices = tuple(
        Choice(c.name, tuple(a for a in c.alternatives if a.name not in in_place))
        for c in problem.choices
    )
    choices = tuple(c for c in choices if len(c.alternatives) > 1)
    without = replace(problem, choices=choices,
                      graph_hash=structure_hash(problem.nodes, problem.storage_bytes, choices))
    least, _ = minimum_budget(problem, time_limit=5)
    least_without, _ = minimum_budget(without, time_limit=5)
    # Both proven optimal here (the pointwise backwards write in place in both).
    assert least.predicted_peak < 0.97 * least_without.predicted_peak

    model, reference, x = _tiny_resnet()
    optimized = monet.optimize(model, least.predicted_peak, (x,), time_limit=5)
    report = optimized.report()
    assert any(name in in_place for name in report.variants.values())
    assert optimized.last_plan.simulation.peak <= least.predicted_peak
    # Measured within a kernel's small scratch of the prediction, and below what any
    # schedule without writing in place can reach.
    assert report.measured_peak == pytest.approx(optimized.last_plan.simulation.peak, rel=0.01)
    assert report.measured_peak < least_without.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pointwise_backwards_write_over_dying_gradients(name, monkeypatch):
    """An activation's backward or a gradient sum whose gradient input dies with it is
    counted in that input's storage, only with variants on: one storage fewer each, and
    a keep-everything peak no higher."""
    from monet.capture import capture
    from monet.graph import analyse

    model, _, x = _setup(name)
    analysed = analyse(capture(model, x))
    assert analysed.in_place and not analyse(capture(model, x), variants=False).in_place
    problem = analysed.problem
    backward = [r for r in analysed.in_place
                if problem.nodes[analysed.index[r.node]].phase == "backward"]
    assert backward
    ops = {str(r.node.target) for r in backward}
    assert ops <= {"aten.threshold_backward.default", "aten.gelu_backward.default",
                   "aten.add.Tensor", "aten.mul.Tensor", "aten.div.Tensor", "aten.sub.Tensor"}
    for rewrite in analysed.in_place:
        node, host = (problem.nodes[analysed.index[n]] for n in (rewrite.node, rewrite.overwrites))
        assert node.phase == host.phase
        assert not node.allocates and node.storages == host.storages
    monkeypatch.setattr("monet.graph._written_in_place",
                        lambda problem, index, rewrites, *reads: (problem, []))
    separate = analyse(capture(model, x)).problem
    assert len(problem.storage_bytes) == len(separate.storage_bytes) - len(analysed.in_place)
    assert keep_all(problem).predicted_peak <= keep_all(separate).predicted_peak

    monkeypatch.undo()
    model, _, x = _setup(name)
    report = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).report()
    assert len(report.in_place) == len(backward) and "in place" in str(report)
    assert len(report.activations_in_place) == len(analysed.in_place) - len(backward)


def test_a_max_pool_backward_from_indices_is_a_choice():
    """A ResNet's stem pool reads a ReLU's output, which that ReLU's backward reads after
    the pool's: the pool's backward from its indices frees nothing there and its stand-in
    adds the input's bytes at that step. Offered as a choice, the least peak is below the
    one with every pool backward reading its indices (as all did when that was no choice:
    ResNet-18 at batch 8, 185.75 against 169.59 MiB)."""
    from monet.operators.pooling import FROM_INDICES
    from monet.solver import minimum_budget

    model, _, x = _tiny_resnet()
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    forced = tuple(int(c.alternatives[-1].name == FROM_INDICES) for c in problem.choices)
    assert sum(forced) == 1
    least, _ = minimum_budget(problem, time_limit=5)
    least_forced, _ = minimum_budget(problem.apply(forced), time_limit=5)
    # Both proven optimal here: 1423248 against 1488848 bytes.
    assert least.predicted_peak < 0.97 * least_forced.predicted_peak


def test_forward_activations_write_over_inputs_nothing_else_reads(tmp_path):
    """A ResNet's ReLU over a residual sum writes over the sum (its backward reads
    nothing), counted as a view of it; a ReLU over a batch norm stays out of place (the
    norm's backward from its output reads its input). Recomputing the sums reruns the
    ReLUs over them: the run peaks where predicted and the step is eager's bit for bit."""
    from monet.capture import capture
    from monet.graph import analyse
    from monet.solver.heuristic import evaluate
    from monet.solver.ilp import analyse as structure_of
    from monet.solver.schedule import Schedule

    model, reference, x = _tiny_resnet()
    analysed = analyse(capture(model, x))
    problem, index = analysed.problem, analysed.index
    forward = [r for r in analysed.in_place if problem.nodes[index[r.node]].phase == "forward"]
    assert {str(r.overwrites.target) for r in forward} == {"aten.add.Tensor"}
    relus = [n for n in analysed.order if n.target is aten.relu.default]
    assert len(forward) == 2 and len(relus) == 5
    for rewrite in forward:
        node, host = problem.nodes[index[rewrite.node]], problem.nodes[index[rewrite.overwrites]]
        assert not node.allocates and node.storages == host.storages

    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    names = {n.name: i for i, n in enumerate(problem.nodes)}
    owner = problem.storage_owner()
    sums = {owner[s] for r in forward for s in problem.nodes[names[r.node.name]].storages}
    captured = (0,) * len(problem.choices)
    applied = problem.apply(captured)
    candidate = evaluate(applied, structure_of(applied), sums)
    assert candidate is not None and {a for a, _ in candidate.recompute} == sums
    schedule = Schedule(problem.graph_hash, None, candidate.kept, candidate.recompute,
                        candidate.peak, candidate.overhead, "feasible", variants=captured)
    path = tmp_path / "sums.json"
    schedule.save(path)

    model, reference, x = _tiny_resnet()
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    report = optimized.report()
    assert len(report.activations_in_place) == 2 and "forward activations" in str(report)
    assert report.recomputed == 2
    assert report.measured_peak == pytest.approx(schedule.predicted_peak, rel=0.01)
    assert_same_step(optimized, model, reference, x, {"rtol": 0, "atol": 0})


def _revvit(batch: int = 2, image_size: int = 32):
    from monet.models import registry

    torch.manual_seed(0)
    model = registry.create("revvit_tiny_test", image_size=image_size)
    x = torch.randn(batch, 3, image_size, image_size, requires_grad=True)
    return model, copy.deepcopy(model), x


@pytest.mark.parametrize("batch,image_size", [(2, 32), (1, 40)])  # 16 and 25 tokens
def test_reversible_keep_reads_the_forward_and_matches_the_reversible_step(
        tmp_path, batch, image_size):
    """``reversible.keep`` on a RevViT's reversible capture: the backward reads the
    forward's activations, the rebuild (F and G run again per block) holds nothing and
    adds no time, and the step equals eager's reversible one up to float rounding."""
    model, reference, x = _revvit(batch, image_size)
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    (site,) = [c for c in problem.choices if c.name == "reversible"]
    assert [a.name for a in site.alternatives] == ["default", "reversible.keep"]
    kept = keep_all(problem, tuple(int(c is site) for c in problem.choices))
    owner = problem.storage_owner()
    dropped = [problem.nodes[owner[s]].op for s in site.alternatives[1].drops]
    assert {"aten.addmm.default", "aten.native_layer_norm.default",
            "aten._scaled_dot_product_flash_attention_for_cpu.default"} <= set(dropped)
    path = tmp_path / "keep.json"
    kept.save(path)

    model, reference, x = _revvit(batch, image_size)
    optimized = monet.optimize(model, kept.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0)
    report = optimized.report()
    assert set(report.variants.values()) == {"reversible.keep"}
    assert optimized.last_plan.simulation.peak == kept.predicted_peak
    assert report.measured_peak <= kept.predicted_peak * 1.05
    # The forward's X2 against the rebuild's Y2 - G(Y1): an ulp apart.
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})
    # The rebuild's linear layers run no more: as many as under plain autograd.
    plain = reference.twin(reversible=False)
    assert _count(aten.addmm.default, optimized, x) == _count(aten.addmm.default, plain, x) < (
        _count(aten.addmm.default, reference, x))


def _count(op, module, x) -> int:
    """How many times one training step of ``module`` calls ``op``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += func is op
            return func(*args, **(kwargs or {}))

    with Count():
        step_with_loss(module, x, seed=1)
    return Count.calls


def test_value_numbers_see_through_a_reversible_coupling():
    from torch import fx

    from monet.operators.reversible import value_numbers

    graph = fx.Graph()
    a, b = graph.placeholder("a"), graph.placeholder("b")
    f = graph.call_function(aten.mul.Tensor, (b, 2.0))
    y = graph.call_function(aten.add.Tensor, (a, f))
    b_again = graph.call_function(aten.detach.default, (b,))
    f_again = graph.call_function(aten.mul.Tensor, (b_again, 2.0))
    a_again = graph.call_function(aten.sub.Tensor, (y, f_again))
    f_other = graph.call_function(aten.mul.Tensor, (b, 3.0))
    not_a = graph.call_function(aten.sub.Tensor, (y, f_other))
    noise = [graph.call_function(aten.bernoulli.p, (a, 0.5)) for _ in range(2)]
    graph.output((a_again, not_a, *noise))
    number, first, coupled = value_numbers(graph)
    assert number[a_again] == number[a] and first[number[a_again]] is a
    assert coupled == {a_again}
    assert number[f_again] == number[f] and number[b_again] == number[b]
    assert number[not_a] not in (number[a], number[b])
    assert number[noise[0]] != number[noise[1]]  # random draws are never one value


def _graph_with_values(build):
    """A graph traced by ``make_fx`` from ``build`` (fake tensors in its nodes' meta)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(build, tracing_mode="fake")


def test_value_numbers_keep_apart_what_only_looks_alike():
    """The coupling rule needs the rebuilt value laid out as the original (no broadcast,
    no type promotion); uninitialised allocations and a value read after it is mutated
    are never equal to another."""
    from monet.operators.reversible import value_numbers

    def build(a, wide, x, h):
        y = a + wide            # [1, 8] + [4, 8] broadcasts to [4, 8]
        back = y - wide         # [4, 8]: not ``a``
        z = h + x               # float16 + float32 promotes to float32
        h_back = z - x          # float32: not ``h``
        spare = (torch.empty_like(x), torch.empty_like(x))
        before = x * 2
        x.add_(1)
        after = x * 2           # reads x after its mutation
        return back, h_back, spare, before, after

    module = _graph_with_values(build)(torch.randn(1, 8), torch.randn(4, 8), torch.randn(4, 8),
                                       torch.randn(4, 8, dtype=torch.float16))
    number, _, coupled = value_numbers(module.graph)
    nodes = {n.name: n for n in module.graph.nodes}
    outputs = module.graph.output_node().args[0]
    back, h_back, (empty_1, empty_2), before, after = outputs
    a, h = nodes["a_1"], nodes["h_1"]
    assert number[back] != number[a] and number[h_back] != number[h] and not coupled
    assert number[empty_1] != number[empty_2]
    assert number[before] != number[after]


def test_a_dropped_rebuild_is_charged_once():
    """Under ``reversible.keep`` the rebuild runs not at all: the exact model and the
    relaxation charge its time once, as its step delta, so the cheapest plan (keep
    everything, fastest variants) costs there what the simulator says, and the
    relaxation's bound at that budget is that cost."""
    from monet.solver.heuristic import fastest_variants, relax_and_repair
    from monet.solver.ilp import solve_cpsat

    model, _, x = _revvit()
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5).last_plan.problem
    fastest = keep_all(problem, fastest_variants(problem))
    (c,) = [c for c, choice in enumerate(problem.choices) if choice.name == "reversible"]
    assert fastest.variants[c] == 1 and fastest.predicted_overhead < 0
    solution = solve_cpsat(problem, fastest.predicted_peak, time_limit=5,
                           hint=(fastest.kept, fastest.recompute, fastest.variants))
    assert solution.objective == pytest.approx(fastest.predicted_overhead, abs=1e-6)
    _, bound = relax_and_repair(problem, fastest.predicted_peak, time_limit=5)
    assert bound == pytest.approx(fastest.predicted_overhead, abs=1e-6)


class _WrittenOutAttention(torch.nn.Module):
    """Attention with its softmax written out, and a log-softmax head (squared, so that
    its incoming gradient is a whole tensor)."""

    def __init__(self, dim: int = 12):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, 5)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        x = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1) @ v
        return self.head(x).log_softmax(dim=-1).square()


def test_softmax_backwards_write_over_their_gradients():
    """A softmax's and a log-softmax's backward on CPU write over the incoming gradient:
    counted in its storage, and the step is eager's bit for bit."""
    from monet.capture import capture
    from monet.graph import analyse

    torch.manual_seed(0)
    model = _WrittenOutAttention()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 7, 12, requires_grad=True)
    ops = {str(r.node.target) for r in analyse(capture(model, x)).in_place}
    assert {"aten._softmax_backward_data.default",
            "aten._log_softmax_backward_data.default"} <= ops
    optimized = monet.optimize(model, 1.0, (x,), measure=False, time_limit=5)
    assert optimized.report().in_place
    assert_same_step(optimized, model, reference, x, {"rtol": 0, "atol": 0})


def _mvit():
    from monet.models.mvit import mvitv2_tiny_test

    torch.manual_seed(0)
    model = mvitv2_tiny_test()
    return model, copy.deepcopy(model), torch.randn(2, 3, 32, 32, requires_grad=True)


def test_fused_attention_backward_is_the_captured_step():
    """Fusing each written-out attention's backward (MViTv2's, with its decomposed
    relative-position bias) into one node runs the same ops: bit for bit."""
    from monet.operators.attention import fuse_attention_backwards

    model, _, x = _mvit()
    # Every block's attention.
    assert _fused_step_is_the_captured_one(model, x, fuse_attention_backwards) == 5


def test_fused_attention_backward_holds_what_the_captured_ops_hold():
    """Fused in three pieces (V's gradient, the logits', the rest), the default frees V,
    the probabilities and the output's gradient where the captured ops do, and writes
    the softmax's backward over its incoming gradient: keeping everything, the same
    peak as without the fusion."""
    peaks = []
    for fused in (True, False):
        model, _, x = _mvit()
        problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                                 attention_variants=fused).last_plan.problem
        peaks.append(keep_all(problem).predicted_peak)
        ops = [n.op for n in problem.nodes]
        for piece in ("attention_values_backward", "attention_scores_backward",
                      "attention_backward"):
            assert ops.count(piece) == (5 if fused else 0)
    assert peaks[0] == peaks[1]


@pytest.mark.parametrize("variant,kernel_variants", [
    ("attention.backward_chunked", False), ("attention.chunked", True)])
def test_chunked_attention_runs_end_to_end(variant, kernel_variants, tmp_path):
    """MViTv2's attention with its probabilities recomputed a chunk of queries at a time
    in the backward (and, with forward kernels, never made whole in the forward either):
    chosen from a schedule file, lowered, run; the step equals eager's, the measured
    peak is the simulated one, and keeping everything else it holds less."""
    model, _, x = _mvit()
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                             kernel_variants=kernel_variants,
                             attention_variants=True).last_plan.problem
    picked = tuple(next((k for k, a in enumerate(c.alternatives) if a.name == variant), 0)
                   for c in problem.choices)
    assert sum(map(bool, picked)) == 5
    schedule = keep_all(problem, picked)
    assert schedule.predicted_peak < keep_all(problem).predicted_peak
    path = tmp_path / "attention.json"
    schedule.save(path)
    model, reference, x = _mvit()
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0, kernel_variants=kernel_variants,
                               attention_variants=True)
    report = optimized.report()
    assert set(report.variants.values()) == {variant}
    assert report.measured_peak == schedule.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})


def test_attention_variants_are_offered_by_default_and_can_be_turned_off():
    """By default the attention's backward is fused and its variants offered; with
    ``attention_variants=False`` no attention's backward is fused or offered."""
    for on in (True, False):
        model, _, x = _mvit()
        options = {} if on else {"attention_variants": False}
        problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                                 **options).last_plan.problem
        assert any(n.op == "attention_backward" for n in problem.nodes) == on
        assert any("attention" in a.name
                   for c in problem.choices for a in c.alternatives) == on


def test_chunked_attention_forward_waits_for_kernel_variants_before_a_max_pool():
    """MViTv2's pooled residuals max-pool downstream of every attention but the last
    stage's: there the chunked forward, which rounds differently, is offered only with
    ``kernel_variants``."""
    offered = []
    for kernel_variants in (False, True):
        model, _, x = _mvit()
        problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                                 kernel_variants=kernel_variants,
                                 attention_variants=True).last_plan.problem
        names = [a.name for c in problem.choices for a in c.alternatives]
        assert names.count("attention.backward_chunked") == 5
        offered.append(names.count("attention.chunked"))
    assert offered == [1, 5]


class _HeadsAttention(torch.nn.Module):
    """A pre-norm block with multi-head attention written out, no bias (as timm's
    ``Attention`` without its fused kernel)."""

    def __init__(self, dim: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.norm = torch.nn.LayerNorm(dim)

    def forward(self, x):
        batch, tokens, width = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(
            batch, tokens, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        logits = (q * (width // self.heads) ** -0.5) @ k.transpose(-2, -1)
        out = logits.softmax(dim=-1) @ v
        return x + self.proj(out.transpose(1, 2).reshape(batch, tokens, width))


@pytest.mark.parametrize("variant", ["attention.backward_chunked", "attention.chunked"])
def test_chunked_attention_without_a_bias_runs_end_to_end(variant, tmp_path):
    """Written-out multi-head attention without a bias: matched, fused bit for bit, and
    each chunked variant runs from a schedule file with the step equal to eager's and the
    measured peak the predicted one."""
    from monet.operators.attention import fuse_attention_backwards

    def build():
        torch.manual_seed(0)
        model = torch.nn.Sequential(_HeadsAttention(), _HeadsAttention())
        return model, copy.deepcopy(model), torch.randn(3, 13, 16, requires_grad=True)

    model, _, x = build()
    assert _fused_step_is_the_captured_one(model, x, fuse_attention_backwards) == 2
    problem = monet.optimize(model, 1.0, (x,), measure=False, time_limit=2,
                             attention_variants=True).last_plan.problem
    picked = tuple(next((k for k, a in enumerate(c.alternatives) if a.name == variant), 0)
                   for c in problem.choices)
    assert sum(map(bool, picked)) == 2
    schedule = keep_all(problem, picked)
    path = tmp_path / "attention.json"
    schedule.save(path)
    model, reference, x = build()
    optimized = monet.optimize(model, schedule.predicted_peak, (x,), schedule=str(path),
                               timing_repeats=0, attention_variants=True)
    report = optimized.report()
    assert set(report.variants.values()) == {variant}
    assert report.measured_peak == schedule.predicted_peak
    assert_same_step(optimized, model, reference, x, {"rtol": 1e-4, "atol": 1e-5})
