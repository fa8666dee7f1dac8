"""Throughput benchmark: `torchrun --nproc_per_node=N -m launch.bench --config configs/X.yaml`.

Runs `bench.warmup + bench.steps` training steps of the config's algorithm graph on a model of
a fixed shape with random weights (default: shaped like Qwen2.5-0.5B: 24 layers, hidden 896,
14 heads / 2 KV heads, vocab 151936), on the config's prompts, without evaluation, checkpoints
or MLflow, and prints a breakdown over the measured steps (warm-up excluded):

    step time, generation tokens/s, training tokens/s and MFU, weight reshard GB/s,
    peak memory per phase and offload moves (CUDA only)

Random weights almost never sample EOS, so responses run to rollout.max_new_tokens: the
generation length is what you set. The breakdown goes to stdout and `<run.output_dir>/bench.json`;
docs/benchmarks.md records runs with command, machine and date.

MFU counts the actor update only, at 6 x parameters x tokens (forward + backward, attention
FLOPs ignored; the log-prob recompute is not counted), against `bench.peak_tflops` per device
(default for H100/H200: 989 dense bf16 TFLOPS; none on CPU, where MFU is not reported).
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch

from core import dist
from core.config import above, at_least
from core.models import dtype_of
from core.reshard import full_weight_buckets
from launch.build import build_job
from launch.config import JobConfig
from launch.entry import exit_after, run_entry
from launch.train import Trainer

logger = logging.getLogger("launch.bench")

SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(model_type="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                         max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                         tie_word_embeddings=True),
    "tiny": dict(model_type="qwen2", hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                 tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
"""Dense bf16 peak per device, by substring of torch.cuda.get_device_name()."""


@dataclass(kw_only=True, slots=True)
class BenchOptions:
    shape: Literal["qwen2.5-0.5b", "tiny", "config"] = "qwen2.5-0.5b"
    """Model shape with random weights; "config": the config's own model section."""
    steps: int = 5
    warmup: int = 1
    peak_tflops: float | None = None
    """Peak dense TFLOPS of one device for MFU; None: looked up for known GPUs."""
    compare_sync: int = 0
    """Also time this many full weight syncs each way, alternating: one all-gather per bucket
    (the default) against one per parameter."""

    def __post_init__(self) -> None:
        at_least(self, 1, "steps")
        at_least(self, 0, "warmup", "compare_sync")
        above(self, 0, "peak_tflops")


@dataclass(kw_only=True, slots=True)
class BenchConfig(JobConfig):
    bench: BenchOptions = field(default_factory=BenchOptions)


def prepare(cfg: BenchConfig) -> BenchConfig:
    if cfg.bench.shape != "config":
        cfg.model.path = None
        cfg.model.config = dict(SHAPES[cfg.bench.shape])
    cfg.run.steps = cfg.bench.warmup + cfg.bench.steps
    cfg.tracking.enabled = False
    cfg.eval.every = 0
    cfg.checkpoint.every = 0
    return cfg


def peak_tflops(cfg: BenchOptions, device: torch.device) -> float | None:
    if cfg.peak_tflops is not None or device.type != "cuda":
        return cfg.peak_tflops
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def summarize(rows: list[dict[str, float]], *, n_params: int, world: int, epochs: int,
              peak: float | None) -> dict[str, Any]:
    """Means over the measured steps of the numbers the breakdown prints."""
    def mean(key: str) -> float | None:
        vals = [r[key] for r in rows if key in r]
        return statistics.fmean(vals) if vals else None

    gen_s, upd_s = mean("timing_s/generate"), mean("timing_s/update_actor")
    resp, prompt = mean("perf/response_tokens"), mean("perf/prompt_tokens")
    out: dict[str, Any] = {"step_s": mean("timing_s/step"), "generate_s": gen_s, "update_actor_s": upd_s,
           "response_tokens": resp, "prompt_tokens": prompt, "world_size": float(world),
           "params": float(n_params)}
    if gen_s and resp is not None:
        out["generate_tokens_per_s"] = resp / gen_s
        out["generate_tokens_per_s_per_device"] = resp / gen_s / world
    if upd_s and resp is not None and prompt is not None:
        tokens = (resp + prompt) * epochs
        out["train_tokens_per_s"] = tokens / upd_s
        out["train_tokens_per_s_per_device"] = tokens / upd_s / world
        out["train_tflops_per_device"] = 6 * n_params * tokens / upd_s / world / 1e12
        if peak:
            out["mfu"] = out["train_tflops_per_device"] / peak
    for key in sorted({k for r in rows for k in r}):
        if key.startswith(("reshard/", "memory/", "offload/")) or key.startswith("timing_s/"):
            out[key] = mean(key)
    return out


def table(s: dict[str, Any]) -> str:
    def f(key: str, fmt: str, unit: str = "") -> str:
        return (fmt.format(s[key]) + unit) if s.get(key) is not None else "n/a"
    lines = [
        f"model parameters        {s['params'] / 1e6:.1f} M on {int(s['world_size'])} processes",
        f"step time               {f('step_s', '{:.3f}', ' s')}",
        f"generation              {f('generate_tokens_per_s', '{:.0f}', ' tok/s')} "
        f"({f('generate_tokens_per_s_per_device', '{:.0f}', ' per device')}; {f('generate_s', '{:.3f}', ' s')})",
        f"training (actor update) {f('train_tokens_per_s', '{:.0f}', ' tok/s')} "
        f"({f('train_tokens_per_s_per_device', '{:.0f}', ' per device')}; {f('update_actor_s', '{:.3f}', ' s')}); "
        f"{f('train_tflops_per_device', '{:.2f}', ' TFLOPS/device')}; MFU {f('mfu', '{:.1%}')}",
        f"weight reshard          {f('reshard/gbps', '{:.2f}', ' GB/s')} "
        f"({f('reshard/bytes', '{:.0f}', ' bytes')} in {f('reshard/seconds', '{:.3f}', ' s')})",
    ]
    lines += [f"{k:<40}{v:.3f}" for k, v in s.items()
              if k.startswith(("memory/", "offload/", "sync_compare/")) and v is not None]
    lines += [f"{k:<40}{v:.3f} s" for k, v in s.items() if k.startswith("timing_s/") and v is not None]
    return "\n".join(lines)


def bench(cfg: BenchConfig) -> dict[str, Any]:
    cfg = prepare(cfg)
    info = dist.info()
    job = build_job(cfg)
    trainer = Trainer(job)
    actor = job.roles.actor
    n_params = sum(p.numel() for p in actor.model.parameters())
    job.hybrid.sync_weights(force=True)
    rows = []
    for step in range(1, cfg.run.steps + 1):
        row = trainer.train_step(job.plan.train, step)
        if info.is_main:
            logger.info("step %d/%d: %.3f s%s", step, cfg.run.steps, row["timing_s/step"],
                        " (warm-up)" if step <= cfg.bench.warmup else "")
        if step > cfg.bench.warmup:
            rows.append(row)
    summary = summarize(rows, n_params=n_params, world=info.world_size,
                        epochs=cfg.actor.epochs, peak=peak_tflops(cfg.bench, info.device))
    summary["device"] = torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu"
    if cfg.bench.compare_sync:
        summary.update(compare_sync(actor.model, cfg, info.device))
    if info.is_main:
        out = Path(cfg.run.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench.json").write_text(json.dumps(summary, indent=1) + "\n")
        logger.info("benchmark (%d measured steps after %d warm-up):\n%s", cfg.bench.steps,
                    cfg.bench.warmup, table(summary))
    return summary


def compare_sync(model: torch.nn.Module, cfg: BenchConfig, device: torch.device) -> dict[str, float]:
    """Seconds of a full gather of the actor's weights (the collective part of a sync), per
    bucket vs per parameter, alternating so both see the same machine state."""
    dtype = dtype_of(cfg.rollout.dtype)
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(cfg.bench.compare_sync):
        for batched in (True, False):
            dist.barrier()
            t0 = time.perf_counter()
            nbytes = 0
            for bucket in full_weight_buckets(model, bucket_bytes=int(cfg.hybrid.bucket_mb * 2**20),
                                              dtype=dtype, batched=batched):
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[batched].append(time.perf_counter() - t0)
    per_bucket, per_param = statistics.median(times[True]), statistics.median(times[False])
    return {"sync_compare/bytes": float(nbytes), "sync_compare/per_bucket_s": per_bucket,
            "sync_compare/per_param_s": per_param, "sync_compare/speedup": per_param / per_bucket}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return run_entry(BenchConfig, bench, argv, before_init=lambda cfg: cfg.rollout.engine.prepare_process())


if __name__ == "__main__":
    exit_after(main)
