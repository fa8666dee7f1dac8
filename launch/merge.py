"""Merge fine-tuned models of one base (TinyR1's branch-merge): `python -m launch.merge
--config configs/merge.yaml` or overrides, e.g.

    python -m launch.merge 'models=[runs/math/hf,runs/code/hf]' 'weights=[0.5,0.5]' \\
        method=task_arithmetic base=runs/base/hf output=runs/merged

* average:          merged = sum_i w_i * theta_i
* task_arithmetic:  merged = base + scale * sum_i w_i * (theta_i - base)

Safetensors in and out, tensor by tensor: at any time memory holds the merged model being built
and one tensor of each input, not every input model. The output folder gets the first model's
config and tokenizer files, so `from_pretrained` (and SGLang) load it.
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from core import dist
from core.config import load_config, parse_cli, to_yaml

logger = logging.getLogger("launch.merge")


@dataclass(kw_only=True, slots=True)
class MergeConfig:
    models: list[str] = field(default_factory=list)
    """Hugging Face folders (safetensors) of models fine-tuned from one base."""
    weights: list[float] = field(default_factory=list)
    """One per model; empty: equal weights summing to 1."""
    method: Literal["average", "task_arithmetic"] = "average"
    base: str | None = None
    """The common base (task_arithmetic)."""
    scale: float = 1.0
    """task_arithmetic: multiplies the summed deltas."""
    output: str = "runs/merged"
    dtype: Literal["float32", "bfloat16", "float16", "keep"] = "keep"
    """Output dtype; keep: the first model's dtype per tensor. Arithmetic is in float32."""


class Weights:
    """Lazy access to the tensors of a safetensors folder (single file or sharded index)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.exists():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").exists():
            single = self.folder / "model.safetensors"
            with safe_open(single, "pt") as f:
                self.files = {k: single for k in f.keys()}
        else:
            raise FileNotFoundError(f"{self.folder} has no model.safetensors (or index): merge needs safetensors")

    def names(self) -> list[str]:
        return list(self.files)

    def get(self, name: str) -> torch.Tensor:
        # Open, copy one tensor out, close: a file kept mapped would keep every page read so far
        # resident, and the inputs would add up to several models of memory.
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name).clone()


def merge(cfg: MergeConfig) -> Path:
    if not cfg.models:
        raise ValueError("merge needs models=[...]")
    weights = cfg.weights or [1.0 / len(cfg.models)] * len(cfg.models)
    if len(weights) != len(cfg.models):
        raise ValueError(f"{len(cfg.models)} models but {len(weights)} weights")
    if cfg.method == "task_arithmetic" and not cfg.base:
        raise ValueError("method=task_arithmetic needs base=<folder>")
    inputs = [Weights(m) for m in cfg.models]
    base = Weights(cfg.base) if cfg.method == "task_arithmetic" and cfg.base else None
    names = inputs[0].names()
    for other in inputs[1:] + ([base] if base else []):
        if set(other.names()) != set(names):
            raise ValueError(f"{other.folder} has different tensors than {inputs[0].folder}: not the same architecture")
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        first = inputs[0].get(name)
        acc = torch.zeros(first.shape, dtype=torch.float32)
        b = base.get(name).float() if base else None
        for w, m in zip(weights, inputs):
            t = m.get(name).float()
            acc += w * (t - b if b is not None else t)
        if b is not None:
            acc = b + cfg.scale * acc
        out_dtype = first.dtype if cfg.dtype == "keep" else getattr(torch, cfg.dtype)
        merged[name] = acc.to(out_dtype).contiguous()
    return _write(cfg, merged, inputs[0].folder)


def _write(cfg: MergeConfig, merged: dict[str, torch.Tensor], template: Path) -> Path:
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, out / "model.safetensors", metadata={"format": "pt"})
    for f in template.iterdir():
        tokenizer_or_config = f.suffix in (".json", ".txt", ".model", ".jinja")
        if f.is_file() and not f.name.startswith("model.safetensors") and tokenizer_or_config:
            shutil.copy(f, out / f.name)
    (out / "merge.yaml").write_text(to_yaml(cfg))
    logger.info("merged %d models (%s) into %s", len(cfg.models), cfg.method, out)
    return out


def main(argv: Sequence[str] | None = None) -> Path:
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(MergeConfig, path, overrides)
    dist.setup_logging()
    return merge(cfg)


if __name__ == "__main__":
    main()
