"""Algorithms as dataflow graphs over role operations and pure functions.

A `Node` names what it computes, the batch fields it reads and the fields it writes. Its op is
either a role operation, written "role.method" (e.g. "actor.log_probs"), or a plain function.

* A role operation is called as `method(batch.only(*inputs), **kwargs)`: it sees exactly the
  fields it declared, so an undeclared dependency fails loudly instead of working by accident.
* A function is called as `fn(*(batch[field] for field in inputs), **kwargs)`: inputs are
  positional, in declared order, so parameters may carry shape names (`rewards_B`). A function
  that drives roles itself (a composite node) lists them in `needs`; they arrive as keyword
  arguments, and the node takes the phase of the first role that has one.

Either returns: None (no outputs); one value (one declared output); a tuple (several, in
declared order); a dict {output: value}; a whole new `Batch` (a node such as generation that
changes the number of samples); or a `Result` wrapping any of these plus metrics.

Before step 1, `validate` checks that every input is produced upstream or by the data loader,
every output is a declared batch field produced by one node only, and there is no cycle; only
roles some node uses get built (`Graph.roles`). Each role class declares the phase it needs
(`phase = Phase.TRAIN`); once the graph is bound to the built roles, `order` is topological and
groups nodes by phase (generate / train) so the device switches as rarely as possible.
"""
from __future__ import annotations

import enum
import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, Protocol, Sequence

from core.batch import FIELDS, Batch


class Phase(str, enum.Enum):
    GENERATE = "generate"
    TRAIN = "train"
    ANY = "any"


class Role(Protocol):
    """A role object a graph binds: it declares the device phase its operations need."""
    phase: ClassVar[Phase]


PROMPTS = "prompts"
"""The one bound object that is not a role: the prompt stream (for composite nodes, `needs`)."""


@dataclass(frozen=True, slots=True)
class Result:
    """A node's return value with metrics: `value` follows the node return conventions.

    `metrics` are this rank's values, averaged over ranks by the launcher (a producer that
    already reduced them returns the same value on every rank); `counts` are summed over ranks.
    """
    value: Any = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    counts: Mapping[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class StepMetrics:
    metrics: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Node:
    name: str
    op: str | Callable[..., Any]
    """"role.method" or a function."""
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the op (configs, loss functions)."""
    needs: tuple[str, ...] = ()
    """Bound objects (roles, or "prompts" for the prompt stream) passed to a function op as
    keyword arguments, for composite nodes such as DAPO's dynamic sampling."""
    phase_override: Phase | None = None
    batch_in: bool = False
    """Pass a function op `batch.only(*inputs)` instead of the fields (composite nodes)."""
    after: tuple[str, ...] = ()
    """Nodes that must run first although no field connects them (e.g. after an update)."""

    @property
    def role(self) -> str | None:
        return self.op.split(".", 1)[0] if isinstance(self.op, str) else None

    @property
    def role_names(self) -> tuple[str, ...]:
        """The roles this node calls: its op's role, else the roles among `needs`."""
        return (self.role,) if self.role else tuple(r for r in self.needs if r != PROMPTS)

    @property
    def op_name(self) -> str:
        return self.op if isinstance(self.op, str) else getattr(self.op, "__name__", repr(self.op))


class GraphError(ValueError):
    pass


class Graph:
    def __init__(self, name: str, nodes: Sequence[Node]) -> None:
        self.name = name
        self.nodes = list(nodes)
        self._bound: dict[str, Callable[..., Any]] = {}
        self._phases: dict[str, Phase] = {}
        names = [n.name for n in self.nodes]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise GraphError(f"graph {name!r}: duplicate node names {sorted(dup)}")
        for node in self.nodes:
            if isinstance(node.op, str) and "." not in node.op:
                raise GraphError(f"node {node.name!r}: op {node.op!r} must be 'role.method' or a function")

    def roles(self) -> set[str]:
        """The roles some node uses: the only ones the launcher builds."""
        return {r for n in self.nodes for r in n.role_names}

    def phase(self, node: Node) -> Phase:
        """The node's phase: its override, else the first of its roles' that is not ANY (known
        once the graph is bound; ANY before)."""
        if node.phase_override is not None:
            return node.phase_override
        return self._phases.get(node.name, Phase.ANY)

    def validate(self, sources: Iterable[str]) -> None:
        """Raise GraphError unless every input is available when its node runs."""
        sources = set(sources)
        producer: dict[str, str] = {}
        for node in self.nodes:
            for out in node.outputs:
                if out not in FIELDS:
                    raise GraphError(f"node {node.name!r} writes {out!r}, which is not a declared "
                                     f"batch field (declare it with core.batch.declare_field)")
                if out in producer or out in sources:
                    first = producer.get(out, "the data loader")
                    raise GraphError(f"field {out!r} is written by node {node.name!r} and by {first}; "
                                     f"each field has one producer")
                producer[out] = node.name
        names = {n.name for n in self.nodes}
        for node in self.nodes:
            for a in node.after:
                if a not in names:
                    raise GraphError(f"node {node.name!r} runs after {a!r}, which is not a node")
            for inp in node.inputs:
                if inp not in producer and inp not in sources:
                    raise GraphError(
                        f"node {node.name!r} needs input {inp!r}, which no node produces and the "
                        f"data loader does not provide (available: {', '.join(sorted(sources | set(producer)))})")
        self.order(sources)

    def order(self, sources: Iterable[str] = ()) -> list[Node]:
        """Topological order; among ready nodes, stay in the current phase while possible."""
        available = set(sources)
        pending = list(self.nodes)
        produced_later = {o for n in self.nodes for o in n.outputs}
        ordered: list[Node] = []
        done: set[str] = set()
        phase = None
        while pending:
            ready = [n for n in pending
                     if all(i in available or i not in produced_later for i in n.inputs)
                     and all(a in done for a in n.after)]
            if not ready:
                raise GraphError(f"graph {self.name!r} has a cycle among "
                                 f"{[n.name for n in pending]}")
            same = [n for n in ready if self.phase(n) in (phase, Phase.ANY)]
            node = same[0] if same else ready[0]
            if self.phase(node) is not Phase.ANY:
                phase = self.phase(node)
            ordered.append(node)
            done.add(node.name)
            pending.remove(node)
            available.update(node.outputs)
            produced_later = {o for n in pending for o in n.outputs}
        return ordered

    def bind(self, roles: Mapping[str, Any]) -> Graph:
        """Resolve "role.method" ops against built role objects (and "prompts"), and take each
        node's phase from its roles."""
        for node in self.nodes:
            if isinstance(node.op, str):
                role, method = node.op.split(".", 1)
                if role not in roles:
                    raise GraphError(f"node {node.name!r} uses role {role!r}, which was not built")
                fn = getattr(roles[role], method, None)
                if not callable(fn):
                    raise GraphError(f"node {node.name!r}: role {role!r} has no operation {method!r}")
                self._bound[node.name] = fn
            else:
                missing = [r for r in node.needs if r not in roles]
                if missing:
                    raise GraphError(f"node {node.name!r} needs {missing}, which were not built")
                self._bound[node.name] = functools.partial(node.op, **{r: roles[r] for r in node.needs})
            self._phases[node.name] = _first_phase([_phase_of(r, roles[r]) for r in node.role_names])
        return self

    def run(self, batch: Batch, *, order: Sequence[Node],
            enter_phase: Callable[[Phase], Mapping[str, float]]) -> tuple[Batch, StepMetrics]:
        """One step: every node in `order`, switching phase through `enter_phase`."""
        step = StepMetrics()
        for node in order:
            if self.phase(node) is not Phase.ANY:
                step.metrics.update(enter_phase(self.phase(node)))
            t0 = time.perf_counter()
            out = self._call(node, batch)
            step.metrics[f"timing_s/{node.name}"] = time.perf_counter() - t0
            if isinstance(out, Result):
                step.metrics.update(out.metrics)
                step.counts.update(out.counts)
                out = out.value
            batch = _merge(node, batch, out)
        return batch, step

    def _call(self, node: Node, batch: Batch) -> Any:
        fn = self._bound[node.name]
        if node.role or node.batch_in:
            return fn(batch.only(*node.inputs), **node.kwargs)
        return fn(*(batch[f] for f in node.inputs), **node.kwargs)

    def to_text(self, sources: Iterable[str] = ()) -> str:
        lines = [f"graph {self.name}:"]
        for node in self.order(sources):
            lines.append(f"  [{self.phase(node).value:8s}] {node.name:14s} {node.op_name:22s} "
                         f"{', '.join(node.inputs) or '-'} -> {', '.join(node.outputs) or '-'}")
        return "\n".join(lines)

    def to_mermaid(self, sources: Iterable[str] = ()) -> str:
        sources = list(sources)
        producer = {o: n.name for n in self.nodes for o in n.outputs}
        lines = ["flowchart TD", '  data[("data loader")]']
        for node in self.nodes:
            lines.append(f'  {node.name}["{node.name}<br/>{node.op_name}<br/>({self.phase(node).value})"]')
        names = {n.name for n in self.nodes}
        for node in self.nodes:
            for a in node.after:
                if a not in names:
                    raise GraphError(f"node {node.name!r} runs after {a!r}, which is not a node")
            for inp in node.inputs:
                src = producer.get(inp, "data" if inp in sources else None)
                if src:
                    lines.append(f"  {src} -->|{inp}| {node.name}")
        return "\n".join(lines)


def _phase_of(name: str, role: Role) -> Phase:
    try:
        phase = role.phase
    except AttributeError:
        phase = None
    if not isinstance(phase, Phase):
        raise GraphError(f"role {name!r} ({type(role).__name__}) does not declare its phase "
                         f"(a class attribute `phase = Phase.TRAIN`, GENERATE or ANY)")
    return phase


def _first_phase(phases: Sequence[Phase]) -> Phase:
    return next((p for p in phases if p is not Phase.ANY), Phase.ANY)


def _merge(node: Node, batch: Batch, out: Any) -> Batch:
    if isinstance(out, Batch):
        new = set(out.fields) - set(batch.fields)
        missing = set(node.outputs) - set(out.fields)
        extra = new - set(node.outputs)
        dropped = set(batch.fields) - set(out.fields)
        if missing or extra or dropped:
            raise GraphError(f"node {node.name!r} returned a batch missing outputs {sorted(missing)}, "
                             f"adding undeclared {sorted(extra)} or dropping {sorted(dropped)}")
        return out
    if out is None:
        values: dict[str, Any] = {}
    elif isinstance(out, dict):
        values = out
    elif isinstance(out, tuple):
        if len(out) != len(node.outputs):
            raise GraphError(f"node {node.name!r} returned {len(out)} values for outputs {node.outputs}")
        values = dict(zip(node.outputs, out))
    else:
        if len(node.outputs) != 1:
            raise GraphError(f"node {node.name!r} returned one value for outputs {node.outputs}")
        values = {node.outputs[0]: out}
    if set(values) != set(node.outputs):
        raise GraphError(f"node {node.name!r} returned {sorted(values)}, declared {list(node.outputs)}")
    return batch.with_fields(**values) if values else batch


@dataclass(slots=True)
class Stage:
    """A graph run for a number of steps before the training graph (e.g. VAPO's value
    pre-training), until max_steps or until `stop(history)` says so."""
    name: str
    graph: Graph
    max_steps: int
    stop: Callable[[list[dict[str, float]]], bool] | None = None


@dataclass(slots=True)
class Plan:
    """What an algorithm runs: optional stages, then the training graph for run.steps steps."""
    train: Graph
    stages: list[Stage] = field(default_factory=list)

    def graphs(self) -> list[Graph]:
        return [s.graph for s in self.stages] + [self.train]

    def roles(self) -> set[str]:
        return set().union(*(g.roles() for g in self.graphs()))


def as_plan(built: Graph | Plan) -> Plan:
    return built if isinstance(built, Plan) else Plan(train=built)
