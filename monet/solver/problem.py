"""The scheduling problem as plain data: what the solver sees, and the CLI's input.

A :class:`Problem` is the joint forward+backward graph reduced to numbers and
indices: for each node its phase, the nodes it reads, the storages its value
references and allocates, its measured time and workspace, and whether it may
be recomputed. It imports no torch, round-trips through JSON, and carries the
hash of the graph it was made from so that a schedule is never applied to
another graph.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MAX_FILE_BYTES = 256 * 1024 * 1024

PHASES = ("input", "tangent", "forward", "backward")


class ProblemFileError(ValueError):
    """A problem or schedule file is malformed, truncated or for another graph."""


@dataclass(frozen=True)
class Node:
    """One node of the joint graph.

    ``phase`` is ``"input"`` for primals (parameters, buffers, user inputs),
    ``"tangent"`` for the gradients flowing into the backward, ``"forward"`` for
    nodes the forward pass computes (ancestors of the forward outputs), and
    ``"backward"`` for everything the backward pass runs.
    """

    name: str
    op: str
    phase: str
    inputs: tuple[int, ...]
    """Indices of the nodes whose values this node reads."""
    storages: tuple[int, ...]
    """Storages its value references (a view references its base's)."""
    allocates: tuple[int, ...]
    """Storages this node allocates: its non-aliasing outputs."""
    time: float = 0.0
    """Measured seconds for one run on the device."""
    workspace: int = 0
    """Bytes the op allocates transiently beyond its outputs."""
    recomputable: bool = True
    """False for random ops (unless their RNG is replayed) and side effects."""
    is_output: bool = False
    """Its value leaves the step (a forward output or a gradient): live to the end."""


@dataclass(frozen=True)
class Override:
    """One node as an alternative implementation runs it."""

    node: int
    inputs: tuple[int, ...]
    """The values it reads instead (other forward or input values, the same backward ones)."""
    time: float
    workspace: int


@dataclass(frozen=True)
class Alternative:
    """One implementation of an operator: the nodes it changes, and how."""

    name: str
    """Variant name, e.g. ``layer_norm.backward_from_output``; ``default`` for the captured one."""
    overrides: tuple[Override, ...] = ()
    lossy: bool = False
    """Changes results beyond float rounding; only offered when the user asks."""
    drops: tuple[int, ...] = ()
    """Storages this alternative never fills (a forward-chunked MLP's hidden values; a
    gradient a backward variant computes otherwise): they hold no bytes, nothing but
    the allocating op's own views reads them, and a forward op among those is not
    recomputed (its outputs are the variant's)."""


@dataclass(frozen=True)
class Choice:
    """An operator with several implementations; the solver picks exactly one.

    ``alternatives[0]`` is the graph as captured (no overrides). Every other
    alternative overrides some nodes' reads, time and workspace, and may leave
    some storages empty (``drops``); it never adds a storage, so memory
    stays counted by the same storages.
    """

    name: str
    alternatives: tuple[Alternative, ...]


@dataclass(frozen=True)
class Problem:
    """Nodes in execution order (forward nodes before backward ones) and storage sizes."""

    nodes: tuple[Node, ...]
    storage_bytes: tuple[int, ...]
    graph_hash: str
    name: str = ""
    budget: int | None = None
    """Peak bytes allowed for the whole step, when the problem carries one."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance (model name, device, input shapes); not validated."""
    choices: tuple[Choice, ...] = ()
    """Operators with alternative implementations (the variants the solver picks from)."""

    def __post_init__(self) -> None:
        validate(self)

    # Index helpers: computed on demand, cheap enough at thousands of nodes.
    def indices(self, phase: str) -> list[int]:
        return [i for i, n in enumerate(self.nodes) if n.phase == phase]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "monet.problem",
            "version": FORMAT_VERSION,
            "name": self.name,
            "graph_hash": self.graph_hash,
            "budget": self.budget,
            "meta": self.meta,
            "storage_bytes": list(self.storage_bytes),
            "nodes": [_node_to_json(n) for n in self.nodes],
            "choices": [_choice_to_json(c) for c in self.choices],
        }

    @classmethod
    def from_json(cls, data: Any) -> Problem:
        _expect(isinstance(data, dict), "problem", "a JSON object")
        _expect(data.get("format") == "monet.problem", "format", "'monet.problem'")
        _expect(data.get("version") == FORMAT_VERSION, "version", f"{FORMAT_VERSION}")
        nodes_data = data.get("nodes")
        _expect(isinstance(nodes_data, list), "nodes", "a list")
        nodes = tuple(_node_from_json(i, n) for i, n in enumerate(nodes_data))
        sizes = data.get("storage_bytes")
        _expect(
            isinstance(sizes, list) and all(_is_int(b) and b >= 0 for b in sizes),
            "storage_bytes",
            "a list of non-negative integers",
        )
        graph_hash = data.get("graph_hash")
        _expect(isinstance(graph_hash, str) and graph_hash, "graph_hash", "a non-empty string")
        budget = data.get("budget")
        _expect(budget is None or (_is_int(budget) and budget > 0), "budget", "null or bytes > 0")
        meta = data.get("meta", {})
        _expect(isinstance(meta, dict), "meta", "an object")
        choices_data = data.get("choices", [])
        _expect(isinstance(choices_data, list), "choices", "a list")
        choices = tuple(_choice_from_json(i, c) for i, c in enumerate(choices_data))
        try:
            problem = cls(
                nodes, tuple(sizes), graph_hash, str(data.get("name", "")), budget, meta, choices
            )
        except ValueError as error:
            raise ProblemFileError(str(error)) from None
        if problem.structure_hash() != graph_hash:
            raise ProblemFileError(
                "graph_hash does not match the nodes: the file was edited or truncated"
            )
        return problem

    def save(self, path: str | Path) -> None:
        write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Problem:
        return cls.from_json(read_json(path))

    def structure_hash(self) -> str:
        """Hash of the graph's structure and sizes (not of timings)."""
        return structure_hash(self.nodes, self.storage_bytes, self.choices)

    def with_budget(self, budget: int) -> Problem:
        return replace(self, budget=budget)

    def default_variants(self) -> tuple[int, ...]:
        return (0,) * len(self.choices)

    def apply(self, variants: tuple[int, ...]) -> Problem:
        """This problem with one alternative fixed per choice: its overrides become the nodes.

        The result has no choices left and keeps this problem's ``graph_hash``,
        so the program, the simulator and the lowering see plain nodes.
        """
        check_variants(self, variants)
        if not self.choices:
            return self
        nodes = list(self.nodes)
        sizes = list(self.storage_bytes)
        for choice, picked in zip(self.choices, variants, strict=True):
            alternative = choice.alternatives[picked]
            for o in alternative.overrides:
                nodes[o.node] = replace(
                    nodes[o.node], inputs=o.inputs, time=o.time, workspace=o.workspace
                )
            for s in alternative.drops:
                sizes[s] = 0
            for a in unrecomputed_ops(self, alternative):
                nodes[a] = replace(nodes[a], recomputable=False)
        return replace(self, nodes=tuple(nodes), storage_bytes=tuple(sizes), choices=())

    def storage_owner(self) -> dict[int, int]:
        """Storage → the node that allocates it (cached: a problem never changes)."""
        owner = self.__dict__.get("_storage_owner")
        if owner is None:
            owner = {s: i for i, n in enumerate(self.nodes) for s in n.allocates}
            object.__setattr__(self, "_storage_owner", owner)
        return owner


def unrecomputed_ops(problem: Problem, alternative: Alternative) -> set[int]:
    """Ops ``alternative`` runs in the forward only: those whose storages it drops, and
    those whose forward node it makes read other values (recomputing one would
    need the reads of the alternative; the program gives it none)."""
    owner = problem.storage_owner()
    ops = {owner[s] for s in alternative.drops if problem.nodes[owner[s]].phase == "forward"}
    for o in alternative.overrides:
        n = problem.nodes[o.node]
        if n.phase == "forward" and set(o.inputs) != set(n.inputs):
            ops.update(owner[s] for s in n.storages)
    return ops


def alternative_nodes(problem: Problem, choice: Choice) -> list[dict[int, Override]]:
    """Per alternative of ``choice``: every node any alternative overrides, as this one runs it
    (the captured node's reads, time and workspace where it does not override it)."""
    nodes = problem.nodes
    touched = sorted({o.node for a in choice.alternatives for o in a.overrides})
    result = []
    for alternative in choice.alternatives:
        effective = {
            i: Override(i, nodes[i].inputs, nodes[i].time, nodes[i].workspace) for i in touched
        }
        effective.update({o.node: o for o in alternative.overrides})
        result.append(effective)
    return result


def check_variants(problem: Problem, variants: tuple[int, ...]) -> None:
    """Refuse a variant vector that does not fit ``problem``'s choices (errors name the field)."""
    if len(variants) != len(problem.choices):
        raise ProblemFileError(
            f"variants: {len(variants)} entries for {len(problem.choices)} choices"
        )
    for c, (choice, picked) in enumerate(zip(problem.choices, variants, strict=True)):
        if not (_is_int(picked) and 0 <= picked < len(choice.alternatives)):
            raise ProblemFileError(
                f"variants[{c}]: {picked!r} is not an alternative of {choice.name} "
                f"(0..{len(choice.alternatives) - 1})"
            )


def structure_hash(
    nodes: tuple[Node, ...] | list[Node],
    storage_bytes: tuple[int, ...],
    choices: tuple[Choice, ...] = (),
) -> str:
    digest = hashlib.sha256()
    for n in nodes:
        digest.update(
            repr((n.op, n.phase, n.inputs, n.storages, n.allocates, n.recomputable, n.is_output))
            .encode()
        )
    digest.update(repr(tuple(storage_bytes)).encode())
    for c in choices:
        digest.update(
            repr(
                [(a.name, a.lossy, [(o.node, o.inputs) for o in a.overrides])
                 + ((a.drops,) if a.drops else ())
                 for a in c.alternatives]
            ).encode()
        )
    return digest.hexdigest()[:32]


MAX_TOTAL_BYTES = 2**53
"""Storages and workspaces must add up below this: exact in a float, safe in CP-SAT."""


def validate(problem: Problem) -> None:
    """Check the invariants every stage relies on; raise ValueError naming the field."""
    nodes, sizes = problem.nodes, problem.storage_bytes
    largest_workspace = max((n.workspace for n in nodes), default=0)
    if sum(sizes) + largest_workspace >= MAX_TOTAL_BYTES:
        raise ValueError(
            "storage_bytes and workspace add up to 2**53 bytes or more: not a real step"
        )
    owner: dict[int, int] = {}
    seen_backward = False
    for i, n in enumerate(nodes):
        where = f"nodes[{i}] ({n.name})"
        if n.phase not in PHASES:
            raise ValueError(f"{where}.phase must be one of {PHASES}, not {n.phase!r}")
        if n.phase == "backward":
            seen_backward = True
        elif n.phase == "forward" and seen_backward:
            raise ValueError(f"{where}: forward nodes must come before backward nodes")
        for j in n.inputs:
            if not 0 <= j < i:
                raise ValueError(f"{where}.inputs: {j} is not an earlier node")
        if n.phase == "forward" and any(nodes[j].phase in ("backward", "tangent") for j in n.inputs):
            raise ValueError(f"{where}: a forward node reads a backward value")
        for s in (*n.storages, *n.allocates):
            if not 0 <= s < len(sizes):
                raise ValueError(f"{where}: storage {s} out of range")
        if not set(n.allocates) <= set(n.storages):
            raise ValueError(f"{where}.allocates must be a subset of .storages")
        for s in n.allocates:
            if s in owner:
                raise ValueError(f"{where}: storage {s} already allocated by nodes[{owner[s]}]")
            owner[s] = i
        if n.phase in ("input", "tangent") and set(n.allocates) != set(n.storages):
            raise ValueError(f"{where}: inputs own their storages")
        if not (math.isfinite(n.time) and n.time >= 0):
            raise ValueError(f"{where}.time must be a finite number >= 0")
    for i, n in enumerate(nodes):
        held = {s for j in n.inputs for s in nodes[j].storages}
        for s in n.storages:
            if s not in owner:
                raise ValueError(f"nodes[{i}] ({n.name}): storage {s} has no allocating node")
            if owner[s] > i:
                raise ValueError(f"nodes[{i}] ({n.name}): storage {s} is allocated later")
            if s not in n.allocates and s not in held:
                raise ValueError(
                    f"nodes[{i}] ({n.name}).storages: it aliases storage {s}, which none of "
                    "its inputs holds"
                )
    dying = dying_reads(problem)
    for i, n in enumerate(nodes):
        _check_workspace(problem, dying, i, n.workspace, f"nodes[{i}] ({n.name}).workspace")
    _validate_choices(problem, dying)


def dying_reads(problem: Problem, more_reads: Iterable[tuple[int, Iterable[int]]] = ()
                ) -> dict[int, set[int]]:
    """Per backward node, the backward storages it reads that die with it: no later node
    reads them, under any alternative (an alternative may read a gradient later than
    the captured node), and no output holds them, whatever the schedule. An in-place op
    may write its output over these. ``more_reads`` are (node, inputs) reads beyond
    the problem's own (a graph's variant rewrites, before the problem has choices)."""
    nodes = problem.nodes
    last: dict[int, int] = {}
    held: set[int] = set()
    reads = [(i, n.inputs) for i, n in enumerate(nodes)]
    reads += [(o.node, o.inputs) for choice in problem.choices
              for alternative in choice.alternatives for o in alternative.overrides]
    reads += list(more_reads)
    # An override naming no such node is refused by the validation that follows, by field.
    reads = [(i, inputs) for i, inputs in reads
             if 0 <= i < len(nodes) and all(0 <= j < len(nodes) for j in inputs)]
    for i, n in enumerate(nodes):
        if n.phase != "backward" or n.is_output:
            held.update(n.storages)
    for i, inputs in reads:
        for j in inputs:
            for s in nodes[j].storages:
                last[s] = max(last.get(s, -1), i)
    dying: dict[int, set[int]] = {}
    for s, i in last.items():
        if s not in held:
            dying.setdefault(i, set()).add(s)
    return dying


def _check_workspace(problem: Problem, dying: dict[int, set[int]], i: int, workspace: int,
                     where: str) -> None:
    """A negative workspace is a backward node that writes its output over storages it
    reads that die with it (in place), or frees them before it has allocated its
    outputs: at most as many bytes as it allocates."""
    if workspace >= 0:
        return
    n, sizes = problem.nodes[i], problem.storage_bytes
    reusable = min(sum(sizes[s] for s in dying.get(i, ())), sum(sizes[s] for s in n.allocates))
    if n.phase != "backward" or -workspace > reusable:
        raise ValueError(
            f"{where} is {workspace}: below 0 only for a backward node that writes over "
            f"storages dying with it (or frees them), and by at most {reusable} bytes here"
        )


def _validate_choices(problem: Problem, dying: dict[int, set[int]]) -> None:
    """Alternatives may change what a node reads, never what it allocates or aliases.

    A node may read other forward or input values (a forward one then holds
    them longer, and its op is not recomputed under that alternative), and other
    backward values where those hold only storages the backward or a tangent
    allocates (the models then hold them to the alternative's last read; a backward
    view of a forward storage would move that storage's last read, which they do not
    model per alternative).
    """
    nodes = problem.nodes
    claimed: dict[int, int] = {}
    for c, choice in enumerate(problem.choices):
        where = f"choices[{c}] ({choice.name})"
        if len(choice.alternatives) < 2:
            raise ValueError(f"{where}: a choice needs at least two alternatives")
        if choice.alternatives[0].overrides or choice.alternatives[0].lossy:
            raise ValueError(f"{where}.alternatives[0] must be the captured graph (no overrides)")
        for k, alternative in enumerate(choice.alternatives):
            seen: set[int] = set()
            for o in alternative.overrides:
                at = f"{where}.alternatives[{k}] ({alternative.name}), node {o.node}"
                if not 0 <= o.node < len(nodes):
                    raise ValueError(f"{at}: no such node")
                if o.node in seen:
                    raise ValueError(f"{at}: overridden twice")
                seen.add(o.node)
                if claimed.setdefault(o.node, c) != c:
                    raise ValueError(f"{at}: already belongs to choices[{claimed[o.node]}]")
                n = nodes[o.node]
                if n.phase not in ("forward", "backward"):
                    raise ValueError(f"{at}: only forward and backward nodes have variants")
                if not (math.isfinite(o.time) and o.time >= 0):
                    raise ValueError(f"{at}: time must be finite and >= 0")
                _check_workspace(problem, dying, o.node, o.workspace, f"{at}: workspace")
                if any(not 0 <= j < o.node for j in o.inputs):
                    raise ValueError(f"{at}.inputs must be earlier nodes")
                moved = _backward_reads(nodes, o.inputs) ^ _backward_reads(nodes, n.inputs)
                if any(not _backward_only(problem, j) for j in moved):
                    raise ValueError(
                        f"{at}: a variant may read other backward values than the captured "
                        "node only where they hold no forward storage")
                held = {s for j in o.inputs for s in nodes[j].storages}
                if not set(n.storages) - set(n.allocates) - set(alternative.drops) <= held:
                    raise ValueError(f"{at}: the node aliases a storage its new inputs lack")
            if alternative.drops:
                _validate_drops(problem, f"{where}.alternatives[{k}] ({alternative.name})",
                                alternative)
    dropped = {s: c for c, choice in enumerate(problem.choices)
               for a in choice.alternatives for s in a.drops}
    for c, choice in enumerate(problem.choices):
        for k, alternative in enumerate(choice.alternatives):
            for o in alternative.overrides:
                for j in o.inputs:
                    for s in nodes[j].storages:
                        if dropped.get(s, c) != c:
                            raise ValueError(
                                f"choices[{c}] ({choice.name}).alternatives[{k}]: node "
                                f"{o.node} reads storage {s}, which choices[{dropped[s]}] "
                                "may drop"
                            )


def _validate_drops(problem: Problem, at: str, alternative: Alternative) -> None:
    """A dropped storage is the own of an op this alternative overrides (forward or
    backward), read (under this alternative) by no node but that op's views (and
    theirs) and values dropped themselves: an empty tensor never reaches a kernel that
    needs its elements."""
    nodes = problem.nodes
    owner = problem.storage_owner()
    overridden = {o.node: o for o in alternative.overrides}
    dropped = set(alternative.drops)
    if len(dropped) != len(alternative.drops):
        raise ValueError(f"{at}.drops: a storage is listed twice")
    for s in alternative.drops:
        if not (_is_int(s) and s in owner):
            raise ValueError(f"{at}.drops: {s!r} is not an allocated storage")
        a = owner[s]
        if nodes[a].phase not in ("forward", "backward") or a not in overridden:
            raise ValueError(
                f"{at}.drops: storage {s} must be allocated by a node this alternative "
                "overrides"
            )
    views = {owner[s] for s in dropped}  # the ops and the views that hold an empty value
    for i, n in enumerate(nodes):
        hit = dropped & set(n.storages)
        if hit and n.is_output:
            raise ValueError(f"{at}.drops: storage {min(hit)} leaves the step (nodes[{i}])")
        if i in views or (n.storages and set(n.storages) <= dropped):
            continue  # a value that is empty itself may read empty ones
        inputs = overridden[i].inputs if i in overridden else n.inputs
        holders = [j for j in inputs if dropped & set(nodes[j].storages)]
        if not holders:
            continue
        if n.allocates or i in overridden or not set(holders) <= views:
            s = min(dropped & {s for j in holders for s in nodes[j].storages})
            raise ValueError(f"{at}.drops: nodes[{i}] ({n.name}) reads dropped storage {s}")
        views.add(i)


def _backward_reads(nodes: tuple[Node, ...], inputs: tuple[int, ...]) -> set[int]:
    return {j for j in inputs if nodes[j].phase in ("backward", "tangent")}


def _backward_only(problem: Problem, j: int) -> bool:
    """Whether node ``j``'s value holds only storages the backward or a tangent allocates
    (reading it longer or not at all moves no forward storage's last read)."""
    owner = problem.storage_owner()
    return all(problem.nodes[owner[s]].phase in ("backward", "tangent")
               for s in problem.nodes[j].storages)


def _node_to_json(n: Node) -> dict[str, Any]:
    data = asdict(n)
    for key in ("inputs", "storages", "allocates"):
        data[key] = list(data[key])
    return data


def _choice_to_json(choice: Choice) -> dict[str, Any]:
    return {
        "name": choice.name,
        "alternatives": [
            {
                "name": a.name,
                "lossy": a.lossy,
                "overrides": [
                    {"node": o.node, "inputs": list(o.inputs), "time": o.time,
                     "workspace": o.workspace}
                    for o in a.overrides
                ],
                **({"drops": list(a.drops)} if a.drops else {}),
            }
            for a in choice.alternatives
        ],
    }


def _choice_from_json(index: int, data: Any) -> Choice:
    where = f"choices[{index}]"
    _expect(isinstance(data, dict) and isinstance(data.get("name"), str), where,
            "an object with a name")
    alternatives = data.get("alternatives")
    _expect(isinstance(alternatives, list), f"{where}.alternatives", "a list")
    parsed = []
    for k, a in enumerate(alternatives):
        at = f"{where}.alternatives[{k}]"
        _expect(isinstance(a, dict) and isinstance(a.get("name"), str), at, "an object with a name")
        _expect(isinstance(a.get("lossy", False), bool), f"{at}.lossy", "true or false")
        overrides = a.get("overrides")
        _expect(isinstance(overrides, list), f"{at}.overrides", "a list")
        parsed_overrides = []
        for m, o in enumerate(overrides):
            ot = f"{at}.overrides[{m}]"
            _expect(isinstance(o, dict), ot, "an object")
            _expect(_is_int(o.get("node")), f"{ot}.node", "an integer")
            _expect(isinstance(o.get("inputs"), list) and all(_is_int(j) for j in o["inputs"]),
                    f"{ot}.inputs", "a list of integers")
            _expect(_is_int(o.get("workspace")), f"{ot}.workspace", "an integer")
            parsed_overrides.append(
                Override(o["node"], tuple(o["inputs"]), finite_number(o, "time"), o["workspace"])
            )
        drops = a.get("drops", [])
        _expect(isinstance(drops, list) and all(_is_int(s) for s in drops), f"{at}.drops",
                "a list of integers")
        parsed.append(Alternative(a["name"], tuple(parsed_overrides), a.get("lossy", False),
                                  tuple(drops)))
    return Choice(data["name"], tuple(parsed))


_NODE_FIELDS = {
    "name": str,
    "op": str,
    "phase": str,
    "inputs": list,
    "storages": list,
    "allocates": list,
    "time": (int, float),
    "workspace": int,
    "recomputable": bool,
    "is_output": bool,
}


def _node_from_json(index: int, data: Any) -> Node:
    _expect(isinstance(data, dict), f"nodes[{index}]", "an object")
    for key, kind in _NODE_FIELDS.items():
        value = data.get(key)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind in (int, (int, float)) and isinstance(value, bool):
            ok = False
        _expect(ok, f"nodes[{index}].{key}", _kind_name(kind))
        if kind is list:
            _expect(all(_is_int(x) for x in value), f"nodes[{index}].{key}", "a list of integers")
    unknown = set(data) - set(_NODE_FIELDS)
    _expect(not unknown, f"nodes[{index}]", f"no unknown fields (got {sorted(unknown)})")
    _expect(math.isfinite(float(data["time"])) if _float_ok(data["time"]) else False,
            f"nodes[{index}].time", "a finite number")
    return Node(
        name=data["name"],
        op=data["op"],
        phase=data["phase"],
        inputs=tuple(data["inputs"]),
        storages=tuple(data["storages"]),
        allocates=tuple(data["allocates"]),
        time=float(data["time"]),
        workspace=data["workspace"],
        recomputable=data["recomputable"],
        is_output=data["is_output"],
    )


def _float_ok(value: Any) -> bool:
    """Whether ``float(value)`` works (an int too large for a float does not)."""
    try:
        float(value)
    except (OverflowError, TypeError, ValueError):
        return False
    return True


def finite_number(data: dict, key: str, optional: bool = False) -> float | None:
    """``data[key]`` as a finite float, or a ProblemFileError naming the field."""
    value = data.get(key)
    if optional and value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _float_ok(value)
    _expect(ok and math.isfinite(float(value)), key,
            "a finite number" + (" or null" if optional else ""))
    return float(value)


def _kind_name(kind: Any) -> str:
    names = {str: "a string", list: "a list", int: "an integer", bool: "true or false"}
    return names.get(kind, "a number")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(condition: Any, field_name: str, expected: str) -> None:
    if not condition:
        raise ProblemFileError(f"invalid field {field_name!r}: expected {expected}")


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write JSON through a uniquely named temporary file and a rename, so readers
    (other processes included) never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            json.dump(data, file, separators=(",", ":"))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def read_json(path: str | Path) -> Any:
    """Read a JSON file with a size limit; errors name the file."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ProblemFileError(f"{path}: {size} bytes is over the {MAX_FILE_BYTES}-byte limit")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ProblemFileError(f"{path}: not valid JSON ({error})") from None
