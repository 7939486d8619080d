"""Random training-step problems shaped like real ones, for tests and solver benchmarks.

A layered forward (each op reads one or two earlier values, some are views,
some are random and may not be recomputed) and a backward that mirrors it the
way autograd does: one gradient node per forward op, reading the incoming
gradient and the values the op's derivative needs.
"""

from __future__ import annotations

import random

from monet.solver.problem import (
    Alternative,
    Choice,
    Node,
    Override,
    Problem,
    dying_reads,
    structure_hash,
)


def random_problem(
    forward_ops: int,
    seed: int = 0,
    view_probability: float = 0.15,
    random_probability: float = 0.1,
    workspace_probability: float = 0.0,
    unit: int = 1024,
) -> Problem:
    """A random problem with ``forward_ops`` forward nodes and about as many backward ones."""
    rng = random.Random(seed)
    nodes: list[Node] = []
    sizes: list[int] = []

    def storage(nbytes: int) -> int:
        sizes.append(nbytes)
        return len(sizes) - 1

    def add(**fields) -> int:
        nodes.append(Node(**fields))
        return len(nodes) - 1

    weight = storage(unit)
    data = storage(4 * unit)
    weight_node = add(name="weight", op="input", phase="input", inputs=(), storages=(weight,),
                      allocates=(weight,), recomputable=False)
    data_node = add(name="data", op="input", phase="input", inputs=(), storages=(data,),
                    allocates=(data,), recomputable=False)
    values = [data_node]
    forward: list[int] = []
    for k in range(forward_ops - 1):
        source = values[-1] if rng.random() < 0.7 else rng.choice(values)
        if rng.random() < view_probability and source != data_node:
            node = add(name=f"view{k}", op="view", phase="forward", inputs=(source,),
                       storages=nodes[source].storages, allocates=(), time=1e-7)
        else:
            inputs = [source]
            if rng.random() < 0.3:
                inputs.append(rng.choice(values + [weight_node]))
            s = storage(rng.randint(1, 8) * unit)
            workspace = rng.randint(1, 4) * unit if rng.random() < workspace_probability else 0
            node = add(name=f"op{k}", op="op", phase="forward", inputs=tuple(dict.fromkeys(inputs)),
                       storages=(s,), allocates=(s,), time=rng.uniform(1e-4, 1e-2),
                       workspace=workspace, recomputable=rng.random() >= random_probability)
        values.append(node)
        forward.append(node)
    out = storage(unit)
    output = add(name="output", op="sum", phase="forward", inputs=(values[-1],), storages=(out,),
                 allocates=(out,), time=1e-5, is_output=True)
    tangent_storage = storage(unit)
    grad = add(name="tangent", op="input", phase="tangent", inputs=(), storages=(tangent_storage,),
               allocates=(tangent_storage,), recomputable=False)
    del output
    for node in reversed(forward):
        n = nodes[node]
        if n.op == "view":
            continue
        reads = [grad] + [k for k in n.inputs if nodes[k].phase == "forward" or k == weight_node]
        if rng.random() < 0.3:
            reads.append(node)
        s = storage(sizes[n.allocates[0]] if n.allocates else unit)
        grad = add(name=f"grad_{n.name}", op="grad", phase="backward",
                   inputs=tuple(dict.fromkeys(reads)), storages=(s,), allocates=(s,),
                   time=rng.uniform(1e-4, 2e-2))
    final = storage(unit)
    add(name="weight_grad", op="grad", phase="backward", inputs=(grad,), storages=(final,),
        allocates=(final,), time=1e-5, is_output=True)
    frozen = tuple(nodes)
    return Problem(frozen, tuple(sizes), structure_hash(frozen, tuple(sizes)), f"random{seed}")


def with_random_choices(problem: Problem, seed: int = 0, count: int = 3,
                        in_place: int = 0, backward_moves: int = 0) -> Problem:
    """``problem`` with up to ``count`` operator choices, shaped like monet's variants.

    A backward node that reads a forward op's input gets an alternative that
    reads a forward reader of that input instead (as a norm's backward may read
    its output), with its own time and workspace; a forward op whose value only
    the backward reads gets one that never fills it, its backward readers
    reading the op's inputs instead (as a forward-chunked MLP's hidden values);
    a forward op gets a faster or slower implementation with a workspace (as
    convolution algorithms do). With ``in_place``, up to that many more backward
    nodes get an alternative that writes its output over storages dying with it
    (a negative workspace, as an in-place batch-norm backward). With
    ``backward_moves``, up to that many more alternatives change which backward values
    the backward reads: a backward node that never fills its storage, its readers
    reading its inputs instead, or one that reads an earlier gradient too (as a fused
    MLP or attention backward split where its variant computes another way).
    """
    rng = random.Random(seed)
    nodes = problem.nodes
    readers: dict[int, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.phase == "forward" and n.allocates:
            for k in n.inputs:
                readers.setdefault(k, []).append(i)
    sites: list[Choice] = []
    backward = [i for i, n in enumerate(nodes) if n.phase == "backward"]
    forward_ops = [i for i, n in enumerate(nodes) if n.phase == "forward" and n.allocates]
    rng.shuffle(backward)
    rng.shuffle(forward_ops)
    claimed: set[int] = set()
    empty: set[int] = set()  # nodes holding a dropped storage: no other choice reads them
    for i in forward_ops if count >= 2 else ():
        dropping = _dropping_alternative(nodes, i, claimed, rng)
        if dropping is not None:
            sites.append(Choice(nodes[i].name, (Alternative("default"), dropping)))
            claimed.update(o.node for o in dropping.overrides)
            empty = {r for r, m in enumerate(nodes) if set(dropping.drops) & set(m.storages)}
            break
    swaps_end = len(sites) + (count + 1) // 2
    for i in backward:
        if len(sites) >= min(swaps_end, count):
            break
        n = nodes[i]
        swaps = [(k, r) for k in n.inputs if nodes[k].phase == "forward"
                 for r in readers.get(k, ()) if r < i and r not in n.inputs and r not in empty]
        if not swaps or i in claimed:
            continue
        old, new = rng.choice(swaps)
        inputs = tuple(new if k == old else k for k in n.inputs)
        alternative = Alternative("from_reader", (
            Override(i, inputs, n.time * rng.uniform(0.8, 1.5), rng.choice((0, 1024, 4096))),
        ))
        sites.append(Choice(n.name, (Alternative("default"), alternative)))
        claimed.add(i)
    for i in forward_ops:
        if len(sites) >= count:
            break
        if i in claimed:
            continue
        n = nodes[i]
        alternative = Alternative("other_algorithm", (
            Override(i, n.inputs, n.time * rng.uniform(0.5, 1.2), rng.choice((0, 2048, 8192))),
        ))
        sites.append(Choice(n.name, (Alternative("default"), alternative)))
    dying = dying_reads(problem)
    held: set[int] = set()  # storages an in-place write or a moved read claims (exact)
    for i in backward:
        if in_place <= 0:
            break
        n = nodes[i]
        reusable = min(sum(problem.storage_bytes[s] for s in dying.get(i, ())),
                       sum(problem.storage_bytes[s] for s in n.allocates))
        if i in claimed or any(c.name == n.name for c in sites) or not reusable:
            continue
        alternative = Alternative("in_place", (
            Override(i, n.inputs, n.time * rng.uniform(0.6, 1.4), -reusable),
        ))
        sites.append(Choice(n.name, (Alternative("default"), alternative)))
        held |= dying.get(i, set())
        in_place -= 1
    owner = problem.storage_owner()

    def backward_only(j: int) -> bool:
        return nodes[j].phase == "backward" and all(
            nodes[owner[t]].phase == "backward" for t in nodes[j].storages)

    for b in backward:
        if backward_moves <= 0:
            break
        n = nodes[b]
        if b in claimed or any(c.name == n.name for c in sites):
            continue
        readers = [r for r, m in enumerate(nodes) if b in m.inputs]
        moved = [j for j in n.inputs if nodes[j].phase == "backward"]
        touching = {t for j in (*moved, b) for t in nodes[j].storages}
        if (n.allocates and not n.is_output and readers and not claimed & set(readers)
                and not touching & held
                and all(backward_only(j) for j in moved) and n.storages == n.allocates
                and all(not nodes[r].is_output and nodes[r].phase == "backward"
                        for r in readers)):
            # Never filled: its readers read its inputs instead.
            overrides = [Override(b, (), 0.0, 0)]
            overrides += [Override(r, tuple(dict.fromkeys(
                k for j in nodes[r].inputs for k in ((*n.inputs,) if j == b else (j,)))),
                nodes[r].time + n.time * rng.uniform(0.8, 1.5), rng.choice((0, 1024)))
                for r in readers]
            alternative = Alternative("unfilled_gradient", tuple(overrides), drops=n.allocates)
            claimed.update(o.node for o in overrides)
            held |= touching
        else:
            earlier = [j for j in backward if j < b and backward_only(j) and j not in n.inputs
                       and not set(nodes[j].storages) & held]
            if not earlier or b in claimed:
                continue
            extra = rng.choice(earlier)
            alternative = Alternative("late_read", (
                Override(b, (*n.inputs, extra), n.time * rng.uniform(0.6, 1.2),
                         rng.choice((0, 1024))),))
            claimed.add(b)
            held |= set(nodes[extra].storages)
        sites.append(Choice(n.name, (Alternative("default"), alternative)))
        backward_moves -= 1
    choices = tuple(sites)
    return Problem(nodes, problem.storage_bytes,
                   structure_hash(nodes, problem.storage_bytes, choices),
                   f"{problem.name}+choices{seed}", choices=choices)


def _dropping_alternative(nodes, i: int, claimed: set[int], rng) -> Alternative | None:
    """An alternative of forward op ``i`` that never fills its storage, or None.

    With no forward op reading ``i`` (or its views), ``i`` runs another way
    (``unfilled``); with one, that op computes ``i``'s part itself from ``i``'s
    inputs and ``i`` is skipped (``fused``, as a forward-chunked MLP's fc2 does
    fc1 and the activation). Backward readers read ``i``'s inputs instead.
    """
    n = nodes[i]
    if n.is_output or not n.inputs:
        return None
    held, fusing = {i}, []
    for r, m in enumerate(nodes):
        if m.phase == "forward" and held & set(m.inputs):
            if m.allocates:
                fusing.append(r)
            else:
                held.add(r)
    if len(fusing) > 1:
        return None
    backward = [r for r, m in enumerate(nodes)
                if m.phase == "backward" and held & set(m.inputs)]
    if claimed & {*held, *fusing, *backward}:
        return None

    def rerouted(m: Node) -> tuple[int, ...]:
        return tuple(dict.fromkeys(
            k for j in m.inputs for k in ((*n.inputs,) if j in held else (j,))
        ))

    if fusing:
        (r,) = fusing
        overrides = [Override(i, (), 0.0, 0)]
        overrides += [Override(v, nodes[v].inputs, 0.0, 0) for v in sorted(held - {i})]
        overrides.append(Override(r, rerouted(nodes[r]),
                                  nodes[r].time + n.time * rng.uniform(0.6, 1.2),
                                  rng.choice((0, 2048))))
    else:
        overrides = [Override(i, n.inputs, n.time * rng.uniform(0.5, 1.5),
                              rng.choice((0, 2048)))]
    for b in backward:
        overrides.append(Override(b, rerouted(nodes[b]), nodes[b].time * rng.uniform(1.0, 1.5),
                                  0))
    return Alternative("fused" if fusing else "unfilled", tuple(overrides), drops=n.allocates)
