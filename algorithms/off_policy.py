"""Off-policy steps as a property of any graph: `algorithm.off_policy.max_staleness = K`.

K = 0 leaves the plan exactly as the algorithm built it (synchronous; bitwise today's run).
K > 0 rewrites every graph of the plan, built-in or user-defined, and the rollout role keeps a
buffer of samples in flight (roles/rollout/buffer.py: partial rollouts, finished-but-unused
groups, the staleness bound). The rewrite:

* every node that samples the training stream through the rollout role (op "rollout.generate",
  or a node that `needs` the rollout and the prompt stream, as common.generate and DAPO's
  dynamic sampling do) gets the prompt stream, so the buffer can keep `in_flight` groups;
* the objective is corrected as decoupled PPO (AReaL: behaviour policy = the engine's per-token
  `rollout_logp`, of whatever version sampled each token; proximal policy = `old_logp`, the
  current weights' recomputation): a truncated importance weight min(pi_old / pi_rollout, C),
  C = `is_cap`, multiplies each token's surrogate (algorithms/correction.py). Where the graph
  already corrects (`rollout_correction` node) it is kept as the algorithm set it.

The proximal policy must be recomputed: a graph whose old_logp is the engine's (bypass) cannot
run off-policy and is refused.
"""
from __future__ import annotations

import dataclasses

from algorithms import common
from algorithms.base import OffPolicy
from algorithms.correction import RolloutCorrection
from core.graph import PROMPTS, Graph, GraphError, Node, Plan


def rewrite(plan: Plan, cfg: OffPolicy) -> Plan:
    """`plan` with off-policy steps (itself when max_staleness = 0)."""
    if cfg.max_staleness == 0:
        return plan
    train = rewrite_graph(plan.train, cfg)
    stages = [dataclasses.replace(s, graph=rewrite_graph(s.graph, cfg)) for s in plan.stages]
    return Plan(train=train, stages=stages)


def rewrite_graph(graph: Graph, cfg: OffPolicy) -> Graph:
    nodes = [_with_stream(n) for n in graph.nodes]
    updates = [n for n in nodes if n.op == "actor.update"]
    if not updates:
        return Graph(graph.name, nodes)  # e.g. VAPO's value pre-training: nothing to correct
    if not any(n.op == "actor.log_probs" and "old_logp" in n.outputs for n in nodes):
        raise GraphError(f"graph {graph.name!r}: off-policy steps (algorithm.off_policy.max_staleness="
                         f"{cfg.max_staleness}) need old_logp recomputed by the actor (the proximal policy); "
                         f"set algorithm.recompute_old_logp=true")
    if any(n.name == "rollout_correction" for n in nodes):
        return Graph(graph.name, nodes)
    correction = common.rollout_correction(RolloutCorrection(is_level="token", is_cap=cfg.is_cap), overlong=False)
    out: list[Node] = []
    for n in nodes:
        if n.op == "actor.update":
            out.append(correction)
            n = dataclasses.replace(n, inputs=n.inputs + ("rollout_is_weights",))
        out.append(n)
    return Graph(graph.name, out)


def _with_stream(node: Node) -> Node:
    """A node that samples through the rollout role, given the prompt stream."""
    if node.op == "rollout.generate":
        return Node(node.name, common.generate_batch, node.inputs, node.outputs, kwargs=node.kwargs,
                    needs=("rollout", PROMPTS), batch_in=True, after=node.after)
    return node
