"""LoRA through peft: wrap a causal LM, and turn its adapter weights back into plain weights.

`apply_lora` freezes the base model and adds low-rank adapters (peft's `get_peft_model`), before
FSDP2 sharding. Everything downstream wants plain weight names: the rollout engine at every
sync, and the saved Hugging Face folder that launch.train and launch.eval load. `merged_weights`
does that on a stream of full tensors, one module at a time:

    W = W_base + scaling * B @ A        (scaling = alpha / r, or alpha / sqrt(r) with rsLoRA)

and renames `base_model.model.<m>.base_layer.weight` to `<m>.weight`. Only a module's three
tensors are held at once, so it works bucket by bucket during a sync.

peft is an optional dependency (`pip install rolegraph[lora]`); it is imported only when LoRA
is enabled.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from core.config import above, at_least, between

PEFT_PREFIX = "base_model.model."


@dataclass(kw_only=True, slots=True)
class LoraConfig:
    enabled: bool = False
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: [
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    """Names of the linear layers that get adapters (Qwen2/Llama naming)."""
    rslora: bool = False
    """Scale by alpha / sqrt(r) instead of alpha / r (rank-stabilised LoRA)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "r")
        above(self, 0, "alpha")
        between(self, 0, 1, "dropout", open_high=True)


def _peft():
    try:
        import peft
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("LoRA needs peft: pip install 'rolegraph[lora]' (or pip install peft)") from e
    return peft


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> Any:
    """The model with frozen base weights and trainable adapters (deterministic init: peft's
    lora_B starts at zero, lora_A draws from the global RNG, so seed before calling)."""
    peft = _peft()
    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), use_rslora=cfg.rslora,
                             bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, config)


def lora_scalings(model: torch.nn.Module) -> dict[str, float]:
    """{plain module name: scaling} of every adapted module ({} for a model without LoRA)."""
    out = {}
    for name, module in model.named_modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict) and "default" in scaling and hasattr(module, "base_layer"):
            out[plain_name(name)] = float(scaling["default"])
    return out


def plain_name(name: str) -> str:
    """A peft parameter or module name as the unwrapped model names it."""
    if name.startswith(PEFT_PREFIX):
        name = name[len(PEFT_PREFIX):]
    return name.replace(".base_layer", "")


class LoraMerger:
    """Folds adapters into base weights on a stream of full tensors (see the module docstring).

    A module's base weight, lora_A and lora_B may arrive in any order; the merged weight is
    emitted as soon as all three are there, so only incomplete modules are held.
    """

    def __init__(self, scalings: dict[str, float]) -> None:
        self.scalings = scalings
        self.pending: dict[str, dict[str, torch.Tensor]] = {}

    def feed(self, name: str, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        part = module = None
        for kind in ("lora_A", "lora_B"):
            if f".{kind}." in name:
                part, module = kind, plain_name(name.split(f".{kind}.")[0])
        if part is None and name.endswith(".base_layer.weight"):
            part, module = "base", plain_name(name[: -len(".weight")])
        if part is None:
            return [(plain_name(name), t)]
        if module not in self.scalings:
            raise KeyError(f"adapter tensor {name!r} belongs to {module!r}, which has no LoRA scaling")
        got = self.pending.setdefault(module, {})
        got[part] = t
        if len(got) < 3:
            return []
        del self.pending[module]
        base = got["base"]
        delta = (got["lora_B"].float() @ got["lora_A"].float()) * self.scalings[module]
        return [(f"{module}.weight", (base.float() + delta).to(base.dtype))]

    def finish(self) -> None:
        if self.pending:
            raise ValueError(f"incomplete LoRA modules (a base or adapter tensor never came): "
                             f"{sorted(self.pending)}")


def merged_buckets(buckets: Iterable[list[tuple[str, torch.Tensor]]], scalings: dict[str, float]
                   ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Buckets of plain (name, tensor) pairs: adapters folded into their base weights, names
    unwrapped; a module split over two buckets leaves with the later."""
    merger = LoraMerger(scalings)
    for bucket in buckets:
        out = [pair for name, t in bucket for pair in merger.feed(name, t)]
        if out:
            yield out
    merger.finish()
