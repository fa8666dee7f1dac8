"""The typed batch passed between graph nodes.

A `Batch` holds tensors with a leading sample dimension B plus per-sample Python metadata
(lists of length B). Every field is declared once, with its shape and meaning, in `FIELDS`;
constructing a batch with an undeclared field is an error, so no node can silently invent keys.
Algorithms that need a new field declare it with `declare_field` next to the code that produces it.

Layout of one sample (P = prompt width, R = response width):

    prompt_ids   [pad pad p0 p1 p2]   left-padded, so all prompts end at column P-1
    response_ids [r0 r1 r2 eos pad]   right-padded; response_mask is 1 on r0..eos

so `cat(prompt_ids, response_ids)` is the model input and the logits at columns P-1 .. P+R-2
predict the response tokens. A batch is immutable: `with_fields` returns a new one.

A multi-turn sample (tool calls, roles/rollout/multiturn.py) also carries `observation_mask`,
1 on the tokens a tool returned between two sampled turns:

    response_ids     [c0 c1 ] o0 o1 a0 eos pad]   ("]" ends a call; o0 o1 its result)
    response_mask    [ 1  1  1  0  0  1   1   0]   sampled tokens: losses, advantages
    observation_mask [ 0  0  0  1  1  0   0   0]   attended to, never in a loss

The model attends to both (`response_tokens`); everything that scores, weights or counts
sampled tokens reads response_mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Literal, Sequence

import torch

from core import dist


@dataclass(frozen=True, slots=True)
class FieldSpec:
    name: str
    kind: Literal["tensor", "meta"]
    shape: str
    """Dimensions, e.g. "B", "B,R"; "B" for metadata lists."""
    doc: str
    pad: float = 0
    """Fill value when batches of different widths are concatenated."""
    pad_side: Literal["left", "right"] = "right"


FIELDS: dict[str, FieldSpec] = {}


def declare_field(name: str, *, shape: str, doc: str, kind: Literal["tensor", "meta"] = "tensor",
                  pad: float = 0, pad_side: Literal["left", "right"] = "right") -> FieldSpec:
    """Declare a batch field. Re-declaring with the same spec is a no-op; a different spec
    is an error (two producers disagreeing about a field's meaning)."""
    spec = FieldSpec(name, kind, shape, doc, pad, pad_side)
    old = FIELDS.get(name)
    if old is not None and old != spec:
        raise ValueError(f"batch field {name!r} is already declared differently: {old}")
    FIELDS[name] = spec
    return spec


# The fields every algorithm shares. Shapes: B samples, P prompt width, R response width.
declare_field("prompt_ids", shape="B,P", doc="prompt token ids, left-padded", pad_side="left")
declare_field("prompt_mask", shape="B,P", doc="1 on real prompt tokens", pad_side="left")
declare_field("response_ids", shape="B,R", doc="sampled token ids, right-padded")
declare_field("response_mask", shape="B,R", doc="1 on generated tokens (the stop token included)")
declare_field("observation_mask", shape="B,R",
              doc="1 on tokens a tool returned inside the response (multi-turn): attended to, never in a loss")
declare_field("env_reward", shape="B", doc="sum of the environment's step rewards (multi-turn; 0 without one)")
declare_field("rollout_logp", shape="B,R", doc="log-prob of each sampled token under the engine")
declare_field("old_logp", shape="B,R", doc="log-prob under the policy that sampled (recomputed by the actor)")
declare_field("ref_logp", shape="B,R", doc="log-prob under the reference policy")
declare_field("scores", shape="B", doc="scorer output in [0, 1] per sequence (1 = correct)")
declare_field("rewards", shape="B", doc="scalar reward per sequence after shaping")
declare_field("loss_mask", shape="B,R", doc="tokens that enter the loss (response_mask minus filtered samples)")
declare_field("values", shape="B,R", doc="critic value of the state before each response token")
declare_field("returns", shape="B,R", doc="critic targets")
declare_field("token_rewards", shape="B,R", doc="per-token reward (sequence reward on the last token, KL terms)")
declare_field("advantages", shape="B,R", doc="per-token advantage")
declare_field("group_ids", shape="B", doc="id of the prompt a sample answers; equal within a group")
declare_field("ground_truth", shape="B", kind="meta", doc="reference answer for the scorer")
declare_field("data_source", shape="B", kind="meta", doc="name of the scorer / dataset of the sample")
declare_field("prompt_text", shape="B", kind="meta", doc="the prompt as text")
declare_field("response_text", shape="B", kind="meta", doc="the decoded response, special tokens removed")
declare_field("finish_reason", shape="B", kind="meta", doc='"stop" (stop token) or "length" (budget hit)')
declare_field("response_budget", shape="B", doc="max_new_tokens the sample was generated with (long)")


class Batch:
    """Immutable mapping of declared fields; tensors share the leading dimension B."""

    __slots__ = ("_data",)

    def __init__(self, **fields: Any) -> None:
        n = None
        for name, value in fields.items():
            spec = FIELDS.get(name)
            if spec is None:
                raise KeyError(f"batch field {name!r} is not declared; declare it with "
                               f"core.batch.declare_field (declared: {', '.join(sorted(FIELDS))})")
            if spec.kind == "tensor" and not isinstance(value, torch.Tensor):
                raise TypeError(f"batch field {name!r} must be a tensor, got {type(value).__name__}")
            if spec.kind == "meta":
                value = list(value)
            size = value.shape[0] if spec.kind == "tensor" else len(value)
            if n is not None and size != n:
                raise ValueError(f"batch field {name!r} has {size} samples, others have {n}")
            n = size
        object.__setattr__(self, "_data", dict(fields))

    def __getattr__(self, name: str) -> Any:
        data = object.__getattribute__(self, "_data")
        if name in data:
            return data[name]
        if name in FIELDS:
            raise AttributeError(f"batch has no field {name!r} yet (it has: {', '.join(data)})")
        raise AttributeError(name)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def __len__(self) -> int:
        for name, value in self._data.items():
            return value.shape[0] if FIELDS[name].kind == "tensor" else len(value)
        return 0

    def __repr__(self) -> str:
        parts = [f"{k}{list(v.shape) if isinstance(v, torch.Tensor) else f'[{len(v)}]'}"
                 for k, v in self._data.items()]
        return f"Batch(B={len(self)}: {', '.join(parts)})"

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(self._data)

    def items(self) -> Iterable[tuple[str, Any]]:
        return self._data.items()

    def with_fields(self, **fields: Any) -> Batch:
        return Batch(**{**self._data, **fields})

    def only(self, *names: str) -> Batch:
        return Batch(**{k: self._data[k] for k in names})

    def select(self, index: Sequence[int] | torch.Tensor) -> Batch:
        idx = torch.as_tensor(index, dtype=torch.long)
        idx_list = idx.tolist()
        out = {}
        for name, value in self._data.items():
            if FIELDS[name].kind == "tensor":
                out[name] = value[idx.to(value.device)]
            else:
                out[name] = [value[i] for i in idx_list]
        return Batch(**out)

    def repeat_interleave(self, n: int) -> Batch:
        """Each sample repeated n times in place (the n samples of one prompt stay adjacent)."""
        return self.select(torch.arange(len(self)).repeat_interleave(n))

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{k: v.to(device) if isinstance(v, torch.Tensor) else v
                        for k, v in self._data.items()})

    def trim(self) -> Batch:
        """Drop columns that are padding in every sample (left of prompts, right of responses)."""
        out = dict(self._data)
        if "prompt_mask" in out:
            keep = out["prompt_mask"].any(0).nonzero()
            start = int(keep[0]) if len(keep) else out["prompt_mask"].shape[1]
            for k in ("prompt_ids", "prompt_mask"):
                if k in out:
                    out[k] = out[k][:, start:]
        if "response_mask" in out:
            keep = response_tokens(self).any(0).nonzero()
            end = int(keep[-1]) + 1 if len(keep) else 0
            for k, spec in FIELDS.items():
                if k in out and spec.shape == "B,R":
                    out[k] = out[k][:, :end]
        return Batch(**out)

    def cut(self, rows: Sequence[int], *, prompt_width: int, response_width: int) -> Batch:
        """`select(rows)` trimmed to the given widths without reading the masks (the widths come
        from `SampleSizes`, so cutting a micro-batch never waits for the device)."""
        out = dict(self.select(rows)._data)
        for k, spec in FIELDS.items():
            if k in out and spec.shape == "B,P" and "prompt_mask" in out:
                out[k] = out[k][:, out[k].shape[1] - prompt_width:]
            elif k in out and spec.shape == "B,R" and "response_mask" in out:
                out[k] = out[k][:, :response_width]
        return Batch(**out)

    def split(self, micro_batch_size: int) -> list[Batch]:
        """Consecutive micro-batches of at most micro_batch_size samples, each trimmed."""
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}")
        return [self.select(range(i, min(i + micro_batch_size, len(self)))).trim()
                for i in range(0, len(self), micro_batch_size)]

    @staticmethod
    def concat(batches: Sequence[Batch]) -> Batch:
        """Concatenate along B; tensors of different widths are padded per their FieldSpec."""
        if not batches:
            raise ValueError("cannot concatenate an empty list of batches")
        names = batches[0].fields
        for b in batches[1:]:
            if set(b.fields) != set(names):
                raise ValueError(f"cannot concatenate batches with fields {names} and {b.fields}")
        out: dict[str, Any] = {}
        for name in names:
            spec = FIELDS[name]
            values = [b[name] for b in batches]
            if spec.kind == "meta":
                out[name] = [x for v in values for x in v]
            else:
                out[name] = torch.cat(_pad_to_common_width(values, spec), dim=0)
        return Batch(**out)

    def gather(self) -> Batch:
        """All ranks' batches concatenated in rank order (collective; moves through CPU)."""
        parts = dist.all_gather_objects(self.to("cpu"))
        return Batch.concat(parts)


def _pad_to_common_width(values: list[torch.Tensor], spec: FieldSpec) -> list[torch.Tensor]:
    if values[0].dim() < 2:
        return values
    width = max(v.shape[1] for v in values)
    out = []
    for v in values:
        extra = width - v.shape[1]
        if extra:
            pad = v.new_full((v.shape[0], extra, *v.shape[2:]), spec.pad)
            v = torch.cat([pad, v] if spec.pad_side == "left" else [v, pad], dim=1)
        out.append(v)
    return out


def model_inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids [B,P+R], attention_mask [B,P+R], position_ids [B,P+R]) for a causal LM."""
    ids = torch.cat([batch.prompt_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.prompt_mask, response_tokens(batch)], dim=1).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, pos


@dataclass(frozen=True, slots=True)
class GlobalCounts:
    """Denominators of one optimizer step, summed over all its micro-batches and all ranks."""
    tokens: float
    """Response tokens (response_mask summed)."""
    seqs: float
    """Sequences."""
    budget: float = 0.0
    """The largest response budget (max_new_tokens) of the step's samples; 0 when the batch
    does not carry `response_budget` (C of seq-mean-token-sum-norm)."""


def response_tokens(batch: Batch) -> torch.Tensor:
    """[B, R] 1 on every real response token: sampled ones and, in a multi-turn sample, the
    observations between them (what the model attends to)."""
    if "observation_mask" not in batch:
        return batch.response_mask
    return (batch.response_mask.bool() | batch.observation_mask.bool()).to(batch.response_mask.dtype)


def loss_mask(batch: Batch) -> torch.Tensor:
    """The tokens that enter losses: `loss_mask` when a node produced one, else response_mask."""
    return batch.loss_mask if "loss_mask" in batch else batch.response_mask


def global_counts(batch: Batch) -> GlobalCounts:
    """Counts of this rank's share of an optimizer step, all-reduced over ranks (collective).
    Sequences count only if they have a token in the loss."""
    mask = loss_mask(batch)
    local = {"tokens": float(mask.sum()), "seqs": float((mask.sum(-1) > 0).sum())}
    total = dist.all_reduce_scalars(local)
    budget = 0.0
    if "response_budget" in batch:  # present on every rank or on none (the graph decides)
        local_max = float(batch.response_budget.max()) if len(batch) else 0.0
        budget = dist.all_reduce_scalars({"b": local_max}, "max")["b"]
    return GlobalCounts(tokens=max(total["tokens"], 1.0), seqs=max(total["seqs"], 1.0), budget=budget)
