"""The actor update, padded against packed, on synthetic long-tail lengths (issue #17).

    python tools/bench_update.py --nproc 2 --samples 32 --budget 4096 --steps 3 --repeats 2

Runs every layout (`--layouts`, default padded,packed,packed+ac) `--repeats` times, alternating
(padded, packed, packed+ac, padded, ...) so that each sees the same machine load, each run in
fresh `--nproc` gloo processes (torchrun), so that peak memory is the layout's own. A run builds
the model (random weights, `--shape`), then per step: the actor's log-probs (no grad, the
old-log-prob pass), then `Actor.update` (forward, backward, AdamW) on this rank's `--samples`
samples at the same token budget per micro-batch (`actor.max_tokens_per_micro_batch`: packed
counts prompt + response tokens, padded the padded rectangle). Lengths: responses log-normal,
clipped to 5..300 tokens (mean ~60; the tail reaches the cap), prompts uniform in 20..60,
seeded per rank, identical for every layout.

Reported per layout: training tokens/s (prompt + response tokens of every rank, per second of
`Actor.update`, median over the measured steps, then over repeats), log-prob tokens/s, and peak
RSS per process during the measured steps (the kernel's high-water mark, reset after warm-up)
and its rise over the RSS before them; the load average at start and end. Markdown to stdout,
everything to `--out` (JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {
    "padded": {"packing": False},
    "packed": {"packing": True},
    "padded+ac": {"packing": False, "activation_checkpointing": True},
    "packed+ac": {"packing": True, "activation_checkpointing": True},
}


def lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    """(prompt lengths, response lengths) of n samples: responses log-normal(3.8, 0.8) clipped
    to 5..300 (mean ~60), prompts uniform in 20..60."""
    rng = random.Random(seed)
    resp = [min(300, max(5, int(rng.lognormvariate(3.8, 0.8)))) for _ in range(n)]
    return [rng.randint(20, 60) for _ in range(n)], resp


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def worker(args: argparse.Namespace) -> None:
    """One rank of one run (under torchrun): build, warm up, measure, write this rank's JSON."""
    import torch

    from algorithms.losses import PolicyLoss
    from core import dist
    from core.batch import Batch
    from core.models import ModelConfig, build_model, shard_model
    from launch.bench import SHAPES
    from roles.actor import Actor

    info = dist.init_distributed(device="cpu")
    shape = dict(SHAPES[args.shape])
    shape["vocab_size"] = args.vocab or shape.get("vocab_size", 151936)  # 151936: Qwen2's
    model = shard_model(build_model(ModelConfig(config=shape), seed=0), dist.mesh())
    cfg = Actor.Config(lr=1e-5, max_update_ratio=None, micro_batch_size=args.samples,
                       max_tokens_per_micro_batch=args.budget, **LAYOUTS[args.layout])
    actor = Actor(cfg, model, total_steps=args.warmup + args.steps)
    p_len, r_len = lengths(args.samples, seed=1000 + info.rank)
    P, R = max(p_len), max(r_len)
    g = torch.Generator().manual_seed(info.rank)
    vocab = shape["vocab_size"]
    prompt_mask = (torch.arange(P)[None] >= P - torch.tensor(p_len)[:, None]).long()
    response_mask = (torch.arange(R)[None] < torch.tensor(r_len)[:, None]).long()
    batch = Batch(prompt_ids=torch.randint(0, vocab, (args.samples, P), generator=g) * prompt_mask,
                  prompt_mask=prompt_mask, response_mask=response_mask,
                  response_ids=torch.randint(0, vocab, (args.samples, R), generator=g) * response_mask,
                  advantages=torch.randn(args.samples, R, generator=g) * response_mask)
    loss_fn = PolicyLoss()
    update_s, logp_s = [], []
    rss_before = 0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:  # the measured steps' own peak: reset the high-water mark
            Path("/proc/self/clear_refs").write_text("5")
            rss_before = _rss_kb("VmRSS")
        dist.barrier()
        t0 = time.perf_counter()
        old = actor.log_probs(batch)
        dist.barrier()
        t1 = time.perf_counter()
        actor.update(batch.with_fields(old_logp=old), loss_fn=loss_fn)
        dist.barrier()
        t2 = time.perf_counter()
        if step >= args.warmup:
            logp_s.append(t1 - t0)
            update_s.append(t2 - t1)
    tokens = float(sum(p_len) + sum(r_len))
    padded = float(args.samples * (P + R))
    sums = dist.all_reduce_scalars({"tokens": tokens, "padded": padded})
    out = {"update_s": update_s, "logp_s": logp_s, "tokens": sums["tokens"], "padded_tokens": sums["padded"],
           "peak_rss_mb": _rss_kb("VmHWM") / 1024, "rss_before_mb": rss_before / 1024,
           "params": sum(p.numel() for p in model.parameters())}
    Path(args.result, f"{info.rank}.json").write_text(json.dumps(out))
    dist.destroy()


def run_once(args: argparse.Namespace, layout: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}", "--standalone",
               str(Path(__file__).resolve()), "--worker", "--layout", layout, "--result", tmp,
               *[f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("shape", "vocab", "samples", "budget", "steps", "warmup") and v is not None]]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("OMP_NUM_THREADS", None)  # core.dist gives each process its share of the cores
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{layout} run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        ranks = [json.loads(Path(tmp, f"{r}.json").read_text()) for r in range(args.nproc)]
    step_s = [max(r["update_s"][i] for r in ranks) for i in range(args.steps)]
    logp_s = [max(r["logp_s"][i] for r in ranks) for i in range(args.steps)]
    return {"update_s": statistics.median(step_s), "logp_s": statistics.median(logp_s),
            "tokens": ranks[0]["tokens"], "padded_tokens": ranks[0]["padded_tokens"],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
            "rss_rise_mb": max(r["peak_rss_mb"] - r["rss_before_mb"] for r in ranks),
            "params": ranks[0]["params"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--shape", default="tiny", help="a launch.bench shape: tiny, qwen2.5-0.5b")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default: the shape's)")
    ap.add_argument("--samples", type=int, default=32, help="samples per rank per update")
    ap.add_argument("--budget", type=int, default=4096, help="max_tokens_per_micro_batch")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--layouts", default="padded,packed,packed+ac")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", default=None, help="write the JSON here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--layout", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, str(ROOT))
        worker(args)
        return
    layouts = args.layouts.split(",")
    load_start = os.getloadavg()
    t0 = time.time()
    runs: dict[str, list[dict]] = {name: [] for name in layouts}
    for rep in range(args.repeats):
        for name in layouts:
            runs[name].append(run_once(args, name))
            r = runs[name][-1]
            print(f"[bench_update] repeat {rep + 1}/{args.repeats} {name}: update {r['update_s']:.2f} s, "
                  f"log-probs {r['logp_s']:.2f} s, peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    p_len, r_len = lengths(args.samples, 1000)
    summary = {
        "command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": time.time() - t0,
        "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "cpus": os.cpu_count(),
        "rank0_response_mean": statistics.fmean(r_len), "rank0_response_max": max(r_len),
        "layouts": {name: {
            "train_tokens_per_s": statistics.median(r["tokens"] / r["update_s"] for r in rs),
            "logp_tokens_per_s": statistics.median(r["tokens"] / r["logp_s"] for r in rs),
            "update_s": [r["update_s"] for r in rs], "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in rs),
            "rss_rise_mb": statistics.median(r["rss_rise_mb"] for r in rs),
            "tokens": rs[0]["tokens"], "padded_tokens": rs[0]["padded_tokens"], "params": rs[0]["params"]}
            for name, rs in runs.items()}}
    lines = ["| layout | training tokens/s | vs padded | log-prob tokens/s | peak RSS / process | RSS rise in update |",
             "|---|---|---|---|---|---|"]
    base = summary["layouts"].get("padded", next(iter(summary["layouts"].values())))
    for name, s in summary["layouts"].items():
        speedup = s["train_tokens_per_s"] / base["train_tokens_per_s"]
        lines.append(f"| {name} | {s['train_tokens_per_s']:.0f} | {speedup:.2f}x | {s['logp_tokens_per_s']:.0f} "
                     f"| {s['peak_rss_mb']:.0f} MB | {s['rss_rise_mb']:.0f} MB |")
    print("\n".join(lines))
    print(f"load average {load_start[0]:.2f} at start, {summary['load_avg_end'][0]:.2f} at end; "
          f"{summary['seconds']:.0f} s", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
