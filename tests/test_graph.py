"""The graph: validation before step 1, phase-grouped order, execution and metrics."""
from __future__ import annotations

import pytest
import torch

from core.batch import Batch
from core.data import PROMPT_FIELDS
from core.graph import Graph, GraphError, Node, Phase, Result


def test_missing_input_names_node_and_field():
    g = Graph("bad", [Node("advantages", lambda r, m: r, ("rewards", "response_mask"), ("advantages",))])
    with pytest.raises(GraphError, match=r"node 'advantages' needs input 'rewards'"):
        g.validate(["response_mask"])


def test_undeclared_output_and_double_producer_are_rejected():
    with pytest.raises(GraphError, match="not a declared batch field"):
        Graph("g", [Node("n", lambda: 1, (), ("my_made_up_field",))]).validate([])
    with pytest.raises(GraphError, match="one producer"):
        Graph("g", [Node("a", lambda: 1, (), ("rewards",)),
                    Node("b", lambda: 1, (), ("rewards",))]).validate([])


def test_cycle_is_rejected():
    g = Graph("g", [Node("a", lambda x: x, ("advantages",), ("rewards",)),
                    Node("b", lambda x: x, ("rewards",), ("advantages",))])
    with pytest.raises(GraphError, match="cycle"):
        g.validate([])


def test_order_groups_phases_and_roles_are_derived():
    from algorithms.grpo import build_graph
    from algorithms.grpo import GRPOConfig, GRPOLoss
    g = build_graph(GRPOConfig(loss=GRPOLoss(kl_coef=0.04)))
    g.validate(PROMPT_FIELDS)
    g.bind({**{name: _role(phase) for name, phase in [("rollout", Phase.GENERATE), ("reward", Phase.ANY),
                                                      ("actor", Phase.TRAIN), ("reference", Phase.TRAIN)]},
            "prompts": iter(())})  # the prompt stream: generate tops the rollout buffer up from it
    phases = [g.phase(n) for n in g.order(PROMPT_FIELDS) if g.phase(n) is not Phase.ANY]
    switches = sum(a is not b for a, b in zip(phases, phases[1:]))
    assert switches == 1  # generate once, then train: one switch per step
    assert g.roles() == {"rollout", "reward", "actor", "reference"}
    assert "reference" not in build_graph(GRPOConfig(loss=GRPOLoss(kl_coef=0.0))).roles()  # no KL -> no reference model built
    assert "flowchart" in g.to_mermaid(PROMPT_FIELDS) and "actor.update" in g.to_text(PROMPT_FIELDS)


def _role(phase: Phase):
    """A stand-in role that declares `phase` and accepts any operation."""
    cls = type(f"Role_{phase.value}", (), {"phase": phase, "__getattr__": lambda self, name: lambda *a, **k: None})
    return cls()


class _Doubler:
    phase = Phase.ANY

    def double(self, batch: Batch) -> Result:
        assert batch.fields == ("rewards",)  # a role op sees only its declared inputs
        return Result(batch.rewards * 2, metrics={"doubler/calls": 1.0}, counts={"doubler/n": 2.0})


def test_run_binds_roles_times_nodes_and_switches_phases():
    g = Graph("g", [Node("d", "doubler.double", ("rewards",), ("advantages",)),
                    Node("plus", lambda a, r: a + r, ("advantages", "rewards"), ("old_logp",))])
    g.bind({"doubler": _Doubler()})
    batch = Batch(rewards=torch.tensor([1.0, 2.0]), group_ids=torch.tensor([0, 1]))
    entered = []
    out, step = g.run(batch, order=g.order(["rewards"]), enter_phase=lambda p: entered.append(p) or {})
    torch.testing.assert_close(out.old_logp, torch.tensor([3.0, 6.0]))
    assert set(step.metrics) >= {"timing_s/d", "timing_s/plus", "doubler/calls"}
    assert step.counts == {"doubler/n": 2.0}
    assert entered == []  # neither node needs a device phase


def test_bind_rejects_unknown_role_or_operation():
    g = Graph("g", [Node("x", "critic.values", (), ("rewards",))])
    with pytest.raises(GraphError, match="role 'critic', which was not built"):
        g.bind({})
    with pytest.raises(GraphError, match="has no operation 'values'"):
        g.bind({"critic": object()})


def test_node_returning_wrong_outputs_fails_loudly():
    g = Graph("g", [Node("n", lambda r: {"oops": r}, ("rewards",), ("advantages",))]).bind({})
    with pytest.raises(GraphError, match="declared"):
        g.run(Batch(rewards=torch.ones(2)), order=g.order(["rewards"]), enter_phase=lambda p: {})
