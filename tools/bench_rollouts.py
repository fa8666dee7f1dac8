"""Long, uneven rollouts side by side (issue #16): the long quickstart's own task, model and length
distribution, four ways, same prompts and seeds, 2 gloo processes each.

    python tools/bench_rollouts.py --steps 20 --out /tmp/bench_rollouts

  (a) lockstep   today's engine: every row runs until the longest one finishes, on a static
                 KV cache (rollout.engine.static_cache=true), synchronous
  (b) continuous the torch engine's continuous scheduler (the CPU default), synchronous
  (c) K=1        (b) + partial rollouts, algorithm.off_policy.max_staleness=1
  (d) K=2        (b) + partial rollouts, max_staleness=2
  (e) packed     (b) with actor.packing=true (not in the default --ways; issue #17's update time
                 on this task's lengths)

Each way is one `launch.train` run of configs/quickstart-long.yaml for `--steps` steps (plus the
step-0 evaluation), `--repeats` times, in the order a b c d a b c d ... so that each sees the same
machine load. (c) and (d) recompute the proximal log-probs (algorithm.recompute_old_logp=true:
an off-policy graph must; the long quickstart itself uses the engine's, one forward pass less);
(a) and (b) run the config as shipped. Every run consumes the same samples per step
(data.prompts_per_step x rollout.n), so held-out accuracy after `--steps` steps is at an equal
number of consumed samples.

Reported per way (steps after the first, medians over repeats): generation tokens/s (response
tokens of the step's batch, all ranks, per second of the generate node: for (c)/(d) a batch also
holds tokens produced in earlier steps, so this is consumed tokens per second of generating),
the engine's useful-token fraction (tokens produced / row-steps computed), step time, samples
per second, the off-policy metrics, and held-out greedy accuracy at the end. Markdown to stdout,
everything to `<out>/bench_rollouts.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/quickstart-long.yaml"
WAYS = {
    "a_lockstep": ["rollout.engine.static_cache=true"],
    "b_continuous": [],
    "c_K1": ["algorithm.off_policy.max_staleness=1", "algorithm.recompute_old_logp=true"],
    "d_K2": ["algorithm.off_policy.max_staleness=2", "algorithm.recompute_old_logp=true"],
    "e_packed": ["actor.packing=true"],  # (b) with the actor's passes on packed rows (issue #17)
}


def run(way: str, out: Path, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "launch.train", "--config", CONFIG, f"run.output_dir={out}", f"run.steps={steps}",
           f"eval.every={steps}", "tracking.enabled=false", "checkpoint.every=0", "checkpoint.export_hf=false",
           *WAYS[way], *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{way} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["step"] >= 2]  # step 1 warms the engine and the allocator up
    gen_s = sum(r["timing_s/generate"] for r in train)
    step_s = [r["timing_s/step"] for r in train]
    samples = train[0]["perf/response_tokens"] / train[0]["response_length/mean"]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]

    def mean(key: str) -> float | None:
        values = [r[key] for r in train if key in r]
        return statistics.fmean(values) if values else None

    return {"way": way, "wall_s": wall, "gen_tokens_per_s": sum(r["perf/response_tokens"] for r in train) / gen_s,
            "useful_token_frac": mean("rollout/useful_token_frac"), "step_s": statistics.fmean(step_s),
            "generate_s": gen_s / len(train), "update_s": mean("timing_s/update_actor"),
            "samples_per_s": samples / statistics.fmean(step_s), "response_length": mean("response_length/mean"),
            "staleness_mean": mean("off_policy/staleness_mean"), "staleness_max": mean("off_policy/staleness_max"),
            "carried_responses": mean("off_policy/carried_responses"), "dropped": mean("off_policy/dropped"),
            "accuracy_start": evals[0], "accuracy_end": evals[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--ways", default="a_lockstep,b_continuous,c_K1,d_K2", help=f"of {', '.join(WAYS)}")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_rollouts"))
    ap.add_argument("overrides", nargs="*", help="key=value overrides for every run")
    args = ap.parse_args()
    ways = args.ways.split(",")
    load = [os.getloadavg()[0]]
    results: dict[str, list[dict]] = {w: [] for w in ways}
    for rep in range(args.repeats):
        for way in ways:
            results[way].append(run(way, args.out / f"{way}-{rep}", args.steps, args.overrides))
            print(f"{way} #{rep}: " + json.dumps({k: v for k, v in results[way][-1].items() if v is not None}),
                  flush=True)
    load.append(os.getloadavg()[0])
    med = {w: {k: statistics.median(r[k] for r in rs) for k in rs[0] if isinstance(rs[0][k], float)}
           for w, rs in results.items()}
    base = med.get("b_continuous")
    print(f"\n{args.steps} steps per run, {args.repeats} repeat(s); load average {load[0]:.1f} -> {load[1]:.1f}\n")
    print("| way | gen tokens/s | useful-token frac | generate s/step | update s/step | step s | samples/s "
          "| staleness mean/max | carried/dropped per step | accuracy start -> end |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, m in med.items():
        ratio = f" ({m['samples_per_s'] / base['samples_per_s']:.2f}x b)" if base and w != "b_continuous" else ""
        gen = f" ({m['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f}x b)" if base and w != "b_continuous" else ""
        stale = (f"{m['staleness_mean']:.2f} / {m['staleness_max']:.0f}" if "staleness_mean" in m else "-")
        carried = (f"{m['carried_responses']:.0f} / {m['dropped']:.0f}" if "carried_responses" in m else "-")
        print(f"| {w} | {m['gen_tokens_per_s']:.0f}{gen} | {m['useful_token_frac']:.3f} | {m['generate_s']:.2f} "
              f"| {m['update_s']:.2f} | {m['step_s']:.2f} | {m['samples_per_s']:.1f}{ratio} | {stale} | {carried} "
              f"| {m['accuracy_start']:.3f} -> {m['accuracy_end']:.3f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_rollouts.json").write_text(json.dumps({"steps": args.steps, "repeats": args.repeats,
                                                               "load": load, "runs": results, "median": med},
                                                              indent=1))


if __name__ == "__main__":
    main()
