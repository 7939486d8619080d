"""Capture: the aten-level joint forward+backward graph of a module, through AOTAutograd.

AOTAutograd traces the module functionally (parameters, buffers and the
tensor leaves of the inputs become the graph's ``primals``), functionalises
it (a batch-norm's running-statistics update becomes an extra forward output
that AOTAutograd's runtime copies back), and hands the joint graph to a
*partition function*. monet's partition function is the rest of its
pipeline: it receives a :class:`JointGraph` and returns the forward and
backward graphs to run; AOTAutograd's runtime then executes them inside one
``torch.autograd.Function``, saving exactly what the forward graph returns.
"""

from __future__ import annotations

import contextlib
import os
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree


class CaptureError(RuntimeError):
    """The model could not be traced into a graph; names the op and the user's line."""


@dataclass
class JointGraph:
    """The joint graph and what monet needs to know about its inputs and outputs."""

    module: fx.GraphModule
    num_forward_outputs: int
    """How many of the output node's values are forward outputs (the rest are gradients)."""
    primal_names: list[str]
    """Per primal placeholder: ``parameter:NAME``, ``buffer:NAME`` or ``input:PATH``."""
    real_primals: list[torch.Tensor] | None = None
    """The real tensors behind the primals (for profiling), when known."""


@dataclass
class CompiledStep:
    """A module's forward compiled through AOTAutograd for one input signature."""

    function: Callable[..., Any]
    tensor_positions: list[int]
    leaves: list[Any]
    spec: pytree.TreeSpec
    primal_names: list[str]

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> Any:
        tensors = flat_tensors(model, args, kwargs)[0]
        return self.function(*tensors)


def flat_tensors(model: nn.Module, args: tuple, kwargs: dict):
    """Parameters, buffers and input leaves, flattened; returns (tensors, leaves, spec, names)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    leaves, spec = pytree.tree_flatten((params, buffers, args, kwargs))
    names = (
        [f"parameter:{n}" for n in params]
        + [f"buffer:{n}" for n in buffers]
        + [f"input:{i}" for i in range(len(leaves) - len(params) - len(buffers))]
    )
    tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
    tensor_names = [n for n, leaf in zip(names, leaves) if isinstance(leaf, torch.Tensor)]
    return tensors, leaves, spec, tensor_names


def compile_step(
    model: nn.Module,
    args: tuple,
    kwargs: dict,
    partition: Callable[[JointGraph], tuple[fx.GraphModule, fx.GraphModule]],
) -> CompiledStep:
    """Wrap ``model`` so that its first call captures and partitions the joint graph.

    Non-tensor leaves of the inputs are baked in as constants (they are part of
    the plan's key); tensor leaves, parameters and buffers are the primals.
    """
    from functorch.compile import aot_function, make_boxed_func

    _refuse_sharded(model)
    _, leaves, spec, names = flat_tensors(model, args, kwargs)
    positions = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    state: dict[str, Any] = {}

    def flat_forward(*flat: torch.Tensor) -> Any:
        filled = list(leaves)
        for position, tensor in zip(positions, flat):
            filled[position] = tensor
        params, buffers, call_args, call_kwargs = pytree.tree_unflatten(filled, spec)
        # Boxed in a one-item list: AOTAutograd hands a flat tuple of outputs back
        # as a list, but a list holding the tuple is rebuilt as it was.
        return [torch.func.functional_call(model, (params, buffers), call_args, call_kwargs)]

    def partition_fn(joint: fx.GraphModule, _joint_inputs: Any, *, num_fwd_outputs: int, **_):
        try:
            return partition(JointGraph(joint, num_fwd_outputs, names, state.get("real")))
        except Exception as error:
            # Planning's own failure (an infeasible budget, a bad schedule file, a bug):
            # the capture is done, so it is not reported as a tracing failure.
            state["planning"] = error
            raise

    def boxed(graph: fx.GraphModule, _example: Any) -> Callable[[list], Any]:
        # Graphs lowered by monet already take their inputs as a list and clear it.
        return graph if getattr(graph, "_boxed_call", False) else make_boxed_func(graph)

    function = aot_function(
        flat_forward,
        fw_compiler=boxed,
        bw_compiler=boxed,
        partition_fn=partition_fn,
        decompositions={torch.ops.aten.native_dropout.default: dropout_decomposition},
    )

    def call(*flat: torch.Tensor) -> Any:
        state["real"] = list(flat)
        try:
            with _explain_failures(state):
                return function(*flat)[0]
        finally:
            state.pop("real", None)
            state.pop("planning", None)

    return CompiledStep(call, positions, leaves, spec, names)


# Dropout's draw, replayable: ``monet::rng_state`` reads the generator's state just
# before it (tagged seeded, so never recomputed: a copy is kept, 5,056 bytes on CPU, 16 on
# CUDA), and ``monet::replayed_bernoulli`` draws from it.
_LIBRARY = torch.library.Library("monet", "DEF")
_LIBRARY.define("rng_state(Device device) -> Tensor", tags=(torch.Tag.nondeterministic_seeded,))
_LIBRARY.define("replayed_bernoulli(Tensor like, float p, Tensor state) -> Tensor")


def _generator_state(device: torch.device) -> torch.Tensor:
    return torch.get_rng_state() if device.type == "cpu" else torch.cuda.get_rng_state(device)


def _set_generator_state(device: torch.device, state: torch.Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _replayed_bernoulli(like: torch.Tensor, p: float, state: torch.Tensor) -> torch.Tensor:
    """``bernoulli(like, p)`` drawn from the generator at ``state``. In the forward the
    generator is at ``state`` (read just before): the draw eager makes, advancing it. A
    recomputation finds it further on (that draw advanced it): it draws from ``state``
    again and puts the generator back, so later draws are eager's."""
    current = _generator_state(like.device)
    if torch.equal(current, state):
        return torch.ops.aten.bernoulli.p(like, p)
    _set_generator_state(like.device, state)
    try:
        return torch.ops.aten.bernoulli.p(like, p)
    finally:
        _set_generator_state(like.device, current)


def _fake_state(device: torch.device) -> torch.Tensor:
    # CUDA's Philox state is a seed and an offset; the CPU's, the Mersenne twister's.
    size = torch.default_generator.get_state().numel() if device.type == "cpu" else 16
    return torch.empty(size, dtype=torch.uint8)


_LIBRARY.impl("rng_state", _generator_state, "CompositeExplicitAutograd")
_LIBRARY.impl("replayed_bernoulli", _replayed_bernoulli, "CompositeExplicitAutograd")
torch.library.register_fake("monet::rng_state", _fake_state, lib=_LIBRARY)
torch.library.register_fake("monet::replayed_bernoulli",
                            lambda like, p, state: torch.empty_like(like), lib=_LIBRARY)


def _empty_like_strides(tensor: torch.Tensor) -> tuple[int, ...]:
    """The strides ``torch.empty_like(tensor)`` gives (preserve_format)."""
    from torch._prims_common import (
        is_non_overlapping_and_dense_or_false,
        make_channels_last_strides_for,
        make_contiguous_strides_for,
        suggest_memory_format,
    )

    if is_non_overlapping_and_dense_or_false(tensor):
        return tuple(tensor.stride())
    if suggest_memory_format(tensor) == torch.channels_last:
        return tuple(make_channels_last_strides_for(tensor.shape))
    return tuple(make_contiguous_strides_for(tensor.shape))


def dropout_decomposition(
    input: torch.Tensor, p: float, train: bool | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``aten.native_dropout`` as its random mask and a multiply, bit for bit as eager.

    As one op, dropout's output could never be recomputed (it is random), so
    every dropout output had to be kept. Split, the output is recomputed from
    the input and the mask; and the mask is drawn by ``monet::replayed_bernoulli``
    from the generator's state read just before (``monet::rng_state``), so it may
    be recomputed too, from that state, as ``torch.utils.checkpoint`` replays a
    block's random numbers. The draw is the same ``bernoulli_`` eager makes, on a
    tensor laid out as ``empty_like(input)`` but made from the shape alone (no read
    of the input for the recomputation to wait on), so the random stream and the
    result are identical.
    """
    if not train:
        return input.clone(), torch.ones_like(input, dtype=torch.bool)
    keep = 1.0 - p
    strides = _empty_like_strides(input)
    like = torch.empty_strided(input.shape, strides, dtype=input.dtype, device=input.device)
    state = torch.ops.monet.rng_state(input.device)
    mask = torch.ops.monet.replayed_bernoulli(like, keep, state).to(torch.bool)
    scale = 0.0 if keep == 0 else 1.0 / keep  # eager's scale, so -0.0 and NaN match too
    return input * mask * scale, mask


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP2's hooks all-gather real shards, which cannot be traced with fake tensors."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return
    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise CaptureError(
            "monet cannot capture a model already sharded with fully_shard (its hooks "
            "all-gather real parameters while AOTAutograd traces with fake ones); apply "
            "fully_shard to the module monet.optimize returns instead"
        )


def capture(model: nn.Module, *args: Any, **kwargs: Any) -> JointGraph:
    """The joint graph of one training step of ``model`` on these inputs (nothing is run
    beyond tracing and one forward, whose side effects on buffers are undone)."""
    from torch._functorch.partitioners import default_partition

    captured: list[JointGraph] = []

    def partition(joint: JointGraph):
        captured.append(joint)
        return default_partition(
            joint.module, None, num_fwd_outputs=joint.num_forward_outputs
        )

    step = compile_step(model, args, kwargs, partition)
    with preserved_state(model, (args, kwargs)):
        step(model, args, kwargs)
    if not captured:
        raise CaptureError(
            "nothing to differentiate: no parameter or input requires grad, so there is "
            "no backward graph to capture"
        )
    return captured[0]


@contextlib.contextmanager
def preserved_state(model: nn.Module, inputs: Any = ()):
    """Undo what a trial step does: buffers, the gradients of parameters and of
    the tensors in ``inputs``, the inputs a forward writes in place, and the RNG stream."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    leaves = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    # Which inputs the forward writes is known only after it ran: copy them all.
    originals = [(t, t._version, t.detach().clone()) for t in leaves if not t.is_inference()]
    holders = list(model.parameters()) + [t for t in leaves if t.requires_grad]
    grads = [t.grad for t in holders]
    with torch.random.fork_rng(devices=_cuda_devices(model)):
        try:
            yield
        finally:
            with torch.no_grad():
                for name, b in model.named_buffers():
                    if name in buffers:
                        b.copy_(buffers[name])
                for tensor, version, original in originals:
                    if tensor._version != version:
                        tensor.copy_(original)
            for tensor, grad in zip(holders, grads):
                tensor.grad = grad


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted(
        {t.device.index or 0 for t in model.parameters() if t.device.type == "cuda"}
    )


_TORCH_DIR = os.path.dirname(torch.__file__)
_MONET_DIR = os.path.dirname(__file__)


@contextlib.contextmanager
def _explain_failures(state: dict | None = None):
    """Turn a tracing failure into a CaptureError naming the op and the user's line;
    what planning raised (``state["planning"]``) and monet's own refusals pass through."""
    try:
        yield
    except Exception as error:
        planning = state is not None and state.get("planning") is error
        refusal = isinstance(error, (CaptureError, ValueError)) and type(
            error).__module__.startswith("monet")
        if planning or refusal:
            raise
        raise _capture_error(error) from error


def _capture_error(error: BaseException) -> BaseException:
    frames = traceback.extract_tb(error.__traceback__)
    user = [
        f for f in frames
        if not f.filename.startswith(_TORCH_DIR) and not f.filename.startswith(_MONET_DIR)
    ]
    if not user:
        return error
    frame = user[-1]
    op = _op_in_message(str(error))
    where = f'{frame.filename}:{frame.lineno} in {frame.name}: "{(frame.line or "").strip()}"'
    what = f" at op {op}" if op else ""
    return CaptureError(
        f"monet could not capture the model{what}, {where}\n"
        f"  {type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ''}\n"
        "  Data-dependent Python control flow, .item()/.tolist() on tensors, and "
        "tensors cached on modules during forward stop the trace."
    )


def _op_in_message(message: str) -> str:
    for word in message.replace("(", " ").replace(")", " ").replace(",", " ").split():
        if word.startswith(("aten.", "aten::")):
            return word.rstrip(".:")
    return ""
