"""Counting helpers for the zoo's tests: parameters and FLOPs against the papers,
and the ops and gradients of a captured joint graph.

Imported by the test files beside it as ``from zoo_counts import ...`` (pytest
puts a test file's folder on ``sys.path``; ``tests`` is not a package).
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from monet.capture import JointGraph


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameter elements (works on meta tensors)."""
    return sum(parameter.numel() for parameter in model.parameters())


def count_flops(model: torch.nn.Module, *inputs: object, **kwargs: object) -> float:
    """Multiply-adds of one no-grad forward, as papers count FLOPs.

    Run it on meta tensors to count a paper-size model without its memory.
    ``FlopCounterMode`` counts a multiply-add as two FLOPs; papers count one,
    so its total is halved.
    """
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs, **kwargs)
    return counter.get_total_flops() / 2


def aten_targets(graph: torch.fx.GraphModule) -> set[str]:
    """The ops a graph calls, e.g. ``"aten.convolution_backward.default"``."""
    return {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}


def gradient_slots(joint: JointGraph) -> dict[str, torch.fx.Node | None]:
    """Per primal (``parameter:NAME``, ``buffer:NAME``, ``input:I``), the joint graph's
    gradient output for it, or None where the step computes none."""
    output = next(node for node in joint.module.graph.nodes if node.op == "output")
    gradients = output.args[0][joint.num_forward_outputs :]
    assert len(gradients) == len(joint.primal_names)
    return dict(zip(joint.primal_names, gradients))
