"""Lower: a schedule's program becomes the forward and backward fx graphs AOTAutograd runs.

The forward graph computes the forward outputs and returns the saved values
after them; the backward graph takes the saved values and the tangents, runs
each slot's recomputations (copies of forward nodes), a ``release`` of the
values whose last reader was in that slot, then the slot's backward node.
Both graphs use the boxed calling convention so that an input is freed at its
last use, as the simulator assumes.
"""

from __future__ import annotations

import copy

from torch import fx
from torch.fx.graph import _BoxedCodeGen

from monet.graph import AnalysedGraph
from monet.operators import Rewrite, apply_rewrites
from monet.solver.problem import Choice
from monet.solver.program import RELEASE, Program


class LoweringError(RuntimeError):
    """The fx graphs disagree with the program (a bug in lowering or in the program)."""


def release(*values: object) -> None:
    """Holds ``values`` alive until this point of the backward graph; frees nothing itself."""
    return


def chosen_rewrites(
    analysed: AnalysedGraph, choices: tuple[Choice, ...], variants: tuple[int, ...]
) -> list[tuple[str, Rewrite]]:
    """(variant name, rewrite) of every non-default alternative the program runs."""
    sites = {site.name: site for site in analysed.sites}
    result = []
    for choice, picked in zip(choices, variants, strict=True):
        if picked == 0:
            continue
        name = choice.alternatives[picked].name
        site = sites.get(choice.name)
        found = [a for a in site.alternatives if a.name == name] if site else []
        if not found:
            raise LoweringError(f"no variant {name} at {choice.name} in this graph")
        result += [(name, rewrite) for rewrite in found[0].rewrites]
    return result


def lower(
    analysed: AnalysedGraph, program: Program, choices: tuple[Choice, ...] = ()
) -> tuple[fx.GraphModule, fx.GraphModule]:
    """Forward and backward graph modules for ``program`` (AOTAutograd's contract).

    ``choices`` are the profiled problem's; the program's variants pick among them.
    """
    from torch._functorch.partitioners import _extract_fwd_bwd_modules

    order = analysed.order
    nodes = analysed.problem.nodes
    joint = analysed.joint.module
    env: dict[fx.Node, fx.Node] = {n: n for n in order}
    rewrites = chosen_rewrites(analysed, choices, program.variants)
    rewrites += [("in_place", r) for r in analysed.in_place]
    if rewrites:
        # Rewrite a copy: the joint graph stays the captured one for later plans.
        graph, env = _copy_graph(joint.graph)
        apply_rewrites(graph, [r for _, r in rewrites], env)
        joint = fx.GraphModule(joint, graph)
        for original, duplicate in env.items():
            if duplicate.name != original.name:
                raise LoweringError(
                    f"copying the graph renamed {original.name} to {duplicate.name}"
                )
    saved = [env[order[i]] for i in program.saved]
    # The backward reads parameters and inputs through the saved values too.
    primal_reads = {
        k
        for step in program.backward
        if step.node != RELEASE
        for k, _ in step.reads
        if nodes[k].phase == "input"
    }
    saved += [env[order[k]] for k in sorted(primal_reads)]
    mutated = {env[n] for n in analysed.mutated_inputs}
    for node in saved:
        if node in mutated:
            # A recomputed batch-norm reads its running statistics after the
            # forward updated them in place; that is correct (graph.py), so skip
            # autograd's version check by stashing them on the context.
            node.meta["saved_tensor_with_no_vc_check"] = True
    forward_module, backward_module = _extract_fwd_bwd_modules(
        joint, saved, [], num_fwd_outputs=analysed.joint.num_forward_outputs
    )
    _drop_unrun(forward_module, analysed, program)
    _check_forward(forward_module, analysed, program)
    backward_module = _reorder_backward(backward_module, analysed, program, choices)
    for module in (forward_module, backward_module):
        module.graph.set_codegen(_BoxedCodeGen())
        module.recompile()
    return forward_module, backward_module


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` (names, metadata and the output's descriptors kept) and the node map."""
    result = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    value, output = result.graph_copy(graph, env, return_output_node=True)
    env[output] = result.output(value)
    env[output].meta = copy.copy(output.meta)
    return result, env


def _drop_unrun(module: fx.GraphModule, analysed: AnalysedGraph, program: Program) -> None:
    """Erase the forward ops nothing reads that the program does not run there.

    torch's extraction keeps what fx deems impure even when nothing reads it: an
    attention kernel tagged seeded for its dropout, run without any. An op only
    the backward reads, recomputed there, must not run in the forward as well.
    Only ops the problem lets move (recomputable: not random, no side effects) go.
    """
    run = {analysed.order[step.node].name for step in program.forward}
    nodes = analysed.problem.nodes
    index = {n.name: i for i, n in enumerate(analysed.order)}
    for node in reversed(list(module.graph.nodes)):
        if (node.op == "call_function" and not node.users and node.name not in run
                and node.name in index and nodes[index[node.name]].recomputable):
            module.graph.erase_node(node)


def _check_forward(module: fx.GraphModule, analysed: AnalysedGraph, program: Program) -> None:
    names = [n.name for n in module.graph.nodes if n.op == "call_function"]
    expected = [analysed.order[step.node].name for step in program.forward]
    if names != expected:
        missing = sorted(set(expected) - set(names))
        extra = sorted(set(names) - set(expected))
        raise LoweringError(f"forward graph differs from the program: missing {missing}, extra {extra}")


def _unmade(analysed: AnalysedGraph, program: Program, choices: tuple[Choice, ...]) -> set[int]:
    """Backward nodes the chosen variants leave empty and nothing reads (the logits'
    gradient under a chunked attention backward): extraction drops them as dead code,
    and skipping them changes no byte the program counts."""
    dropped = {s for choice, k in zip(choices, program.variants, strict=False)
               for s in choice.alternatives[k].drops}
    empty = {i for i, n in enumerate(analysed.problem.nodes)
             if n.phase == "backward" and n.storages and set(n.storages) <= dropped}
    readers: dict[int, set[int]] = {}
    for step in program.backward:
        if step.node != RELEASE:
            for k, _ in step.reads:
                readers.setdefault(k, set()).add(step.node)
    unread: set[int] = set()
    for i in sorted(empty, reverse=True):  # readers come later: settled first
        if readers.get(i, set()) <= unread:
            unread.add(i)
    return unread


def _reorder_backward(
    module: fx.GraphModule, analysed: AnalysedGraph, program: Program,
    choices: tuple[Choice, ...],
) -> fx.GraphModule:
    by_name = {n.name: n for n in module.graph.nodes}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in module.graph.find_nodes(op="placeholder"):
        env[n] = graph.node_copy(n, lambda m: env[m])
    placed = set(env)
    order = analysed.order
    empty = _unmade(analysed, program, choices)
    for step in program.backward:
        if step.node == RELEASE:
            values = tuple(env[by_name[order[i].name]] for i, _ in step.reads)
            graph.call_function(release, values)
            continue
        name = order[step.node].name
        source = by_name.get(name)
        if source is None and step.node in empty:
            continue  # a value the chosen variant never makes, which nothing reads
        if source is None:
            raise LoweringError(f"the program runs {name} in the backward; the graph lacks it")
        missing = [m.name for m in source.all_input_nodes if m not in env]
        if missing:
            raise LoweringError(f"{name} runs before its inputs {missing} exist")
        env[source] = graph.node_copy(source, lambda m: env[m])
        placed.add(source)
    # Extraction copies every node whose inputs are available and keeps the
    # unused random ones (dead-code elimination spares impure ops): drop what
    # nothing placed reads, so no stray op runs or draws random numbers.
    leftover = {n for n in module.graph.nodes if n.op == "call_function" and n not in placed}
    needed = [n.name for n in leftover if any(u not in leftover for u in n.users)]
    if needed:
        raise LoweringError(f"backward graph nodes the program does not run: {needed}")
    graph.node_copy(module.graph.output_node(), lambda m: env[m])
    graph.lint()
    return fx.GraphModule(module, graph)
