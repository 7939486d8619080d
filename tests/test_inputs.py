"""What users feed monet, tried class by class against eager PyTorch on the same seeds.

Every case runs the same call through ``monet.optimize(model)`` and through a
deep copy of the plain model, and requires the same outputs (structure, values,
non-tensor entries), the same parameter and input gradients (``None`` where
eager's is ``None``) and the same buffers. Where monet refuses an input by
design, the test checks the error says why.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import io

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree

import monet


def _twin(tree):
    """The same inputs as new leaves, so that each side collects its own input gradients."""
    return pytree.tree_map_only(
        torch.Tensor, lambda t: t.detach().clone().requires_grad_(t.requires_grad), tree
    )


def _loss(out) -> torch.Tensor:
    """A weighted sum over the floating outputs that require grad (weights make every
    element's gradient distinct)."""
    total = torch.zeros((), dtype=torch.float64)
    for o in pytree.tree_leaves(out):
        if isinstance(o, torch.Tensor) and o.requires_grad:
            weights = torch.linspace(-1, 2, o.numel(), dtype=o.dtype, device=o.device)
            total = total + (o * weights.view(o.shape)).sum().double().cpu()
    return total


def _assert_same(actual, expected, what: str) -> None:
    assert pytree.tree_structure(actual) == pytree.tree_structure(expected), what
    for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected), strict=True):
        if isinstance(e, torch.Tensor):
            assert isinstance(a, torch.Tensor), what
            assert a.requires_grad == e.requires_grad, what
            torch.testing.assert_close(a, e, msg=lambda m: f"{what}: {m}")
        else:
            assert type(a) is type(e) and a == e, what


def _grad(t: torch.Tensor):
    return None if t.grad is None else t.grad.detach().clone()


class Twin:
    """A model optimised by monet beside a deep copy of it run eagerly."""

    def __init__(self, model: nn.Module, budget=1.0, **settings):
        self.reference = copy.deepcopy(model)
        self.model = model
        self.optimized = monet.optimize(model, budget, measure=False, **settings)

    def step(self, *args, seed: int = 0, **kwargs):
        """One forward and backward on each side; everything compared; monet's outputs returned."""
        results = []
        for module, root in ((self.optimized, self.model), (self.reference, self.reference)):
            inputs = _twin((args, kwargs))
            root.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            out = module(*inputs[0], **inputs[1])
            loss = _loss(out)
            if loss.requires_grad:
                loss.backward()
            leaves = [x for x in pytree.tree_leaves(inputs) if isinstance(x, torch.Tensor)]
            results.append((
                out,
                {n: _grad(p) for n, p in root.named_parameters()},
                [_grad(x) for x in leaves],
                {n: b.detach().clone() for n, b in root.named_buffers()},
                pytree.tree_map_only(torch.Tensor, lambda t: t.detach().clone(), inputs),
            ))
        (out, grads, input_grads, buffers, inputs), expected = results
        _assert_same(out, expected[0], "outputs")
        _assert_same(grads, expected[1], "parameter gradients")
        _assert_same(input_grads, expected[2], "input gradients")
        _assert_same(buffers, expected[3], "buffers")
        _assert_same(inputs, expected[4], "inputs after the call")
        return out


def mlp(width: int = 8) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, width), nn.BatchNorm1d(width), nn.GELU(), nn.Dropout(0.2), nn.Linear(width, 3)
    )


# ------------------------------------------------------------------ shapes


def test_a_new_shape_gets_its_own_correct_plan_and_the_first_shape_reuses_its_plan():
    twin = Twin(mlp())
    twin.step(torch.randn(6, 4))
    first = twin.optimized.last_plan
    twin.step(torch.randn(10, 4), seed=1)
    assert len(twin.optimized.plans) == 2 and twin.optimized.last_plan is not first
    twin.step(torch.randn(6, 4), seed=2)
    assert len(twin.optimized.plans) == 2 and twin.optimized.last_plan is first


def test_a_convnet_on_a_new_image_size_plans_again():
    torch.manual_seed(0)
    twin = Twin(nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    ))
    for size in (8, 12, 8):
        twin.step(torch.randn(2, 3, size, size))
    assert len(twin.optimized.plans) == 2


# ------------------------------------------------------------ dtype, device


def test_float64_model_and_inputs():
    twin = Twin(mlp().double())
    out = twin.step(torch.randn(6, 4, dtype=torch.float64, requires_grad=True))
    assert out.dtype == torch.float64


class Casting(nn.Module):
    """Casts its input to the parameters' dtype, as many models do."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 3)

    def forward(self, x):
        return self.linear(x.to(self.linear.weight.dtype))


def test_a_float64_input_to_a_float32_model_gets_a_float64_gradient():
    torch.manual_seed(0)
    twin = Twin(Casting())
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    twin.step(x)
    twin.step(x.float())  # the float32 input is another signature
    assert len(twin.optimized.plans) == 2


def test_an_input_in_a_dtype_the_model_cannot_take_fails_as_in_eager():
    optimized = monet.optimize(nn.Linear(4, 2), "1MiB", measure=False)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        optimized(torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_model_and_inputs_on_cuda_and_back():
    torch.manual_seed(0)
    twin = Twin(mlp().cuda())
    twin.step(torch.randn(6, 4, device="cuda", requires_grad=True))
    twin.model.cpu()
    twin.reference.cpu()
    twin.step(torch.randn(6, 4, requires_grad=True))
    assert len(twin.optimized.plans) == 2


# ------------------------------------------------------- unused and frozen


class Unused(nn.Module):
    """A parameter and an input the forward never reads."""

    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 3)
        self.unused = nn.Linear(4, 3)

    def forward(self, x, ignored):
        return self.used(x)


def test_an_unused_parameter_and_an_unused_input_keep_no_gradient():
    torch.manual_seed(0)
    twin = Twin(Unused())
    twin.step(torch.randn(5, 4, requires_grad=True), torch.randn(5, requires_grad=True))
    assert twin.model.unused.weight.grad is None and twin.model.used.weight.grad is not None


def test_frozen_parameters_get_no_gradient_and_the_others_are_right():
    model = mlp()
    model[0].requires_grad_(False)
    twin = Twin(model)
    twin.step(torch.randn(6, 4))
    assert model[0].weight.grad is None and model[4].weight.grad is not None
    # Unfreezing changes the graph: a new plan, as right as the first.
    model[0].requires_grad_(True)
    twin.reference[0].requires_grad_(True)
    twin.step(torch.randn(6, 4), seed=1)
    assert len(twin.optimized.plans) == 2 and model[0].weight.grad is not None


def test_a_frozen_model_still_differentiates_its_input():
    model = mlp()
    model.requires_grad_(False)
    twin = Twin(model)
    twin.step(torch.randn(6, 4, requires_grad=True))
    assert len(twin.optimized.plans) == 1


def test_a_frozen_model_on_an_input_without_grad_runs_as_eager():
    # No autograd graph, nothing to plan: like no_grad, the model runs as it is
    # (it still updates its batch-norm statistics, as eager does).
    model = mlp()
    model.requires_grad_(False)
    twin = Twin(model)
    twin.step(torch.randn(6, 4))
    assert twin.optimized.plans == {}
    # Asked to plan it now, monet says there is nothing to plan.
    with pytest.raises(RuntimeError, match="nothing to plan: no parameter or input requires grad"):
        monet.optimize(model, 1.0, (torch.randn(6, 4),), measure=False)


def test_a_submodule_switched_to_eval_gets_a_new_plan():
    # Freezing batch-norm statistics (or dropout) inside a training model traces
    # another graph: the plan made in training mode would keep updating them.
    twin = Twin(mlp())
    twin.step(torch.randn(6, 4))
    for model in (twin.model, twin.reference):
        model[1].eval()
        model[3].eval()
    twin.step(torch.randn(6, 4), seed=1)
    assert len(twin.optimized.plans) == 2


class Scaled(nn.Module):
    """A forward steered by plain attributes: a scale, a flag, and a call counter."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.scale = 1.0
        self.squash = False
        self.calls = 0

    def forward(self, x):
        self.calls += 1  # the forward's own state: it must not key the plan
        y = self.linear(x) * self.scale
        return torch.tanh(y) if self.squash else y


def test_a_changed_attribute_plans_again_and_a_counter_does_not():
    import warnings

    twin = Twin(Scaled())
    with pytest.warns(UserWarning, match=r"Scaled\.calls: the forward itself changes it"):
        twin.step(torch.randn(5, 4, requires_grad=True))  # plans on this first call
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twin.step(torch.randn(5, 4, requires_grad=True), seed=1)
        assert len(twin.optimized.plans) == 1
        for model in (twin.model, twin.reference):
            model.scale, model.squash = 2.5, True
        twin.step(torch.randn(5, 4, requires_grad=True), seed=2)  # new values, new plan
        assert len(twin.optimized.plans) == 2
        for model in (twin.model, twin.reference):
            model.scale, model.squash = 1.0, False
        twin.step(torch.randn(5, 4, requires_grad=True), seed=3)  # the first plan again
        assert len(twin.optimized.plans) == 2


# ----------------------------------------------------------- non-tensor inputs


class Mode(enum.Enum):
    RELU = "relu"
    TANH = "tanh"


class Steered(nn.Module):
    """A forward steered by ints, floats, bools, None, strings and enums."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x, repeats, scale=1.0, shift=True, bias=None, act="relu", mode=Mode.RELU):
        y = self.linear(x) * scale
        for _ in range(repeats):
            y = self.linear(y)
        if shift:
            y = y + 1
        if bias is not None:
            y = y - bias
        y = torch.relu(y) if act == "relu" else torch.tanh(y)
        y = torch.relu(y) if mode is Mode.RELU else torch.tanh(y)
        return self.head(y)


STEERING = [
    ((1,), {}),
    ((2,), {"scale": 0.5, "shift": False, "bias": 3, "act": "tanh"}),
    ((2, 0.5, False, 3, "tanh"), {}),  # the same values, positional
    ((0,), {"bias": 1.5, "mode": Mode.TANH, "act": "relu"}),
    ((1,), {}),  # the first call again: its plan is reused
]


def test_non_tensor_arguments_steer_the_forward_and_key_the_plan():
    torch.manual_seed(0)
    twin = Twin(Steered())
    x = torch.randn(5, 4)
    for seed, (args, kwargs) in enumerate(STEERING):
        twin.step(x, *args, seed=seed, **kwargs)
    # Positional and keyword spellings of the same call are different pytrees.
    assert len(twin.optimized.plans) == 4


class Reshaping(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)

    def forward(self, x, shape, dtype=torch.float32):
        return self.linear(x).reshape(shape).to(dtype)


def test_sizes_lists_and_dtypes_as_arguments():
    torch.manual_seed(0)
    twin = Twin(Reshaping())
    x = torch.randn(4, 4)
    twin.step(x, torch.Size([6, 4]))
    twin.step(x, [2, 12], dtype=torch.float64)
    twin.step(x, (3, 8))
    assert len(twin.optimized.plans) == 3


class Options:
    def __init__(self, scale: float):
        self.scale = scale


class TakesAnything(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, extra):
        return self.linear(x) * float(extra.scale if isinstance(extra, Options) else extra[0])


@pytest.mark.parametrize(
    "extra, name",
    [(np.ones(3), "numpy.ndarray"), (Options(2.0), f"{__name__}.Options")],
)
def test_an_argument_that_can_change_unseen_is_refused(extra, name):
    # An array or an object can change without its repr changing: a plan reused
    # for it would compute with the old value, so monet refuses it by name.
    optimized = monet.optimize(TakesAnything(), "1MiB", measure=False)
    with pytest.raises(TypeError, match=f"cannot take the {name} passed as args\\[1\\]"):
        optimized(torch.randn(2, 4), extra)


class WritesItsInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, counter):
        counter.add_(1)
        return self.linear(x) * counter


def test_an_input_written_in_place_is_written_once_per_call():
    # Planning and measuring run trial steps; what they write into inputs is undone.
    torch.manual_seed(0)
    twin = Twin(WritesItsInput())
    counter = torch.zeros(4)
    for _ in range(2):
        twin.optimized(torch.randn(3, 4), counter)
    assert counter.tolist() == [2.0] * 4
    twin.step(torch.randn(3, 4), torch.zeros(4))


# ------------------------------------------------------------- requires grad


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.linear(x) * y.sigmoid()


@pytest.mark.parametrize("x_grad, y_grad", [(False, False), (True, False), (False, True), (True, True)])
def test_inputs_with_and_without_grad(x_grad, y_grad):
    torch.manual_seed(0)
    twin = Twin(TwoInputs())
    twin.step(torch.randn(3, 4, requires_grad=x_grad), torch.randn(3, 4, requires_grad=y_grad))


def test_requires_grad_on_an_input_is_part_of_the_plan():
    torch.manual_seed(0)
    twin = Twin(TwoInputs())
    for x_grad in (False, True, False):
        twin.step(torch.randn(3, 4, requires_grad=x_grad), torch.randn(3, 4))
    assert len(twin.optimized.plans) == 2


# ------------------------------------------------------------------- outputs


class ManyOutputs(nn.Module):
    """Outputs of every kind: nested containers, non-tensors, integer and detached
    tensors, the input itself and a view of it."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        y = self.linear(x)
        if self.kind == "dict":
            return {"logits": y, "aux": {"mean": y.mean(), "scaled": y * 2}}
        if self.kind == "tuple":
            return y, y.relu()
        if self.kind == "nested":
            return (y, [y.sum(), (y.tanh(), [y.exp()])])
        if self.kind == "non_tensor":
            return {"y": y, "name": "head", "none": None, "count": 3, "ratio": 0.5, "flag": True}
        # "special": tensors that are not fresh differentiable results
        return y, y.argmax(-1), y.detach(), x, x.view(-1), self.linear.weight


@pytest.mark.parametrize("kind", ["dict", "tuple", "nested", "non_tensor", "special"])
def test_outputs_of_every_structure(kind):
    torch.manual_seed(0)
    twin = Twin(ManyOutputs(kind))
    twin.step(torch.randn(3, 4, requires_grad=True))


@dataclasses.dataclass
class Prediction:
    logits: torch.Tensor


class ReturnsAnObject(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        return Prediction(self.linear(x))


def test_an_output_object_that_is_not_a_pytree_is_refused():
    # monet cannot see the tensors inside a class pytree does not know; AOTAutograd
    # says so and how to fix it (pytree-registered outputs, e.g. Hugging Face's, work).
    optimized = monet.optimize(ReturnsAnObject(), "1MiB", measure=False)
    with pytest.raises(RuntimeError, match="not a known type. If this type holds tensors, you "
                       "need to register a pytree for it"):
        optimized(torch.randn(2, 4))


# --------------------------------------------------------------------- state


def test_state_dict_is_the_wrapped_models():
    model = mlp()
    optimized = monet.optimize(model, 1.0, measure=False)
    ours, theirs = optimized.state_dict(), model.state_dict()
    assert list(ours) == list(theirs) and not any(k.startswith("module.") for k in ours)
    for key in theirs:
        assert ours[key].data_ptr() == theirs[key].data_ptr()
    fresh = mlp()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1)
    optimized.load_state_dict(fresh.state_dict())
    assert torch.equal(model[0].weight, fresh[0].weight)
    # A prefixed state (what nn.Module's own state_dict of the wrapper would be) is refused.
    prefixed = {f"module.{k}": v for k, v in theirs.items()}
    with pytest.raises(RuntimeError, match="Missing key"):
        optimized.load_state_dict(prefixed)


def test_a_state_saved_after_training_with_monet_loads_into_the_plain_model():
    model = mlp()
    reference = copy.deepcopy(model)
    optimized = monet.optimize(model, 1.0, measure=False)
    for module in (optimized, reference):
        optimizer = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
        generator = torch.Generator().manual_seed(1)
        for step in range(3):
            optimizer.zero_grad(set_to_none=True)
            torch.manual_seed(step)
            _loss(module(torch.randn(6, 4, generator=generator))).backward()
            optimizer.step()
    buffer = io.BytesIO()
    torch.save(optimized.state_dict(), buffer)
    buffer.seek(0)
    plain = mlp()
    plain.load_state_dict(torch.load(buffer, weights_only=True))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], value)
    x = torch.randn(6, 4)
    plain.eval()
    reference.eval()
    assert torch.equal(plain(x), reference(x))


@pytest.mark.parametrize("convert", ["wrapper", "wrapped"])
def test_to_float64_plans_again_and_float32_returns_to_the_first_plan(convert):
    twin = Twin(mlp())
    twin.step(torch.randn(6, 4))
    first = twin.optimized.last_plan
    (twin.optimized if convert == "wrapper" else twin.model).to(torch.float64)
    twin.reference.to(torch.float64)
    twin.step(torch.randn(6, 4, dtype=torch.float64), seed=1)
    assert len(twin.optimized.plans) == 2
    assert twin.optimized.last_plan.step is not first.step
    twin.optimized.to(torch.float32)
    twin.reference.to(torch.float32)
    twin.step(torch.randn(6, 4), seed=2)
    assert twin.optimized.last_plan is first
