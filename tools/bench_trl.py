"""rolegraph and TRL's GRPOTrainer side by side on one workload, equal settings (issue #19).

    pip install -c constraints.txt -e '.[bench]'      # brings trl
    python tools/bench_trl.py --config configs/quickstart.yaml --steps 12 --warmup 2 --nproc 1

Both sides start from `model.path`, train on the config's task rows in rolegraph's sampling
order (TRL's shuffle off, so both see the same problems in the same order at one process), are
rewarded by the same scorer, and take one optimizer step per generation batch of
data.prompts_per_step x rollout.n completions: fp32, no KL, a token-mean loss (TRL: "dapo",
normalized by the batch's tokens), group-normalized advantages, clip 0.2, the same learning
rate, schedule, betas, weight decay and gradient clip, the same temperature / top-p / top-k and
budget. rolegraph skips the old-log-prob forward (`algorithm.recompute_old_logp=false`), as
TRL does with one update per generation batch. Neither side evaluates inside the timed steps.

Printed (and written to --out as JSON): per-step medians after the warm-up steps, the ratio
TRL / rolegraph (> 1: rolegraph faster), held-out greedy accuracy after the last step on both
sides (the same rows, one evaluator: rolegraph's, on the TRL model saved at the end), a
per-phase breakdown (rolegraph: its graph nodes; TRL: generation and scoring, the rest of the
step), and whether the machine was busy: the CPU time other processes took during each timed
run, from /proc/stat, as a share of the machine (> 10% flags the ratio as unreliable).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUSY_SHARE = 0.10
"""Other processes' share of the machine's CPU time above which a run is flagged busy."""


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine so far."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def timed_run(cmd: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `cmd`; its wall time, and the share of the machine's CPU that other processes took
    meanwhile (the machine's busy time minus the children's CPU time)."""
    busy0, total0 = cpu_jiffies()
    before = os.times()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = os.times()
    busy1, total1 = cpu_jiffies()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    hz = os.sysconf("SC_CLK_TCK")
    children = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    other = max((busy1 - busy0) / hz - children, 0.0)
    machine = (total1 - total0) / hz
    return {"wall_s": wall, "other_cpu_share": other / machine if machine else 0.0, "stdout": proc.stdout}


def torchrun(nproc: int, *args: str, python: str = sys.executable) -> list[str]:
    return [python, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def equal_settings(steps: int, *, bf16: bool = False) -> list[str]:
    """The overrides that put rolegraph on TRL's footing (module docstring); bf16: bfloat16
    compute on both sides (rolegraph: actor and engine weights in bf16, float32 masters; TRL:
    bf16=True, autocast with float32 weights)."""
    return [f"run.steps={steps}", "algorithm.name=grpo", "algorithm.loss.agg_mode=token-mean",
            "algorithm.loss.kl_coef=0.0", "algorithm.recompute_old_logp=false", "tracking.enabled=false",
            "checkpoint.export_hf=false", f"eval.every={steps}",
            *(["actor.param_dtype=bfloat16", "rollout.dtype=bfloat16"] if bf16 else [])]


def random_model(shape: str, like: str, folder: Path) -> Path:
    """A seeded random Qwen2 of `shape` ("hidden x layers x heads x kv_heads", e.g. 384x8x6x2)
    with the tokenizer of the folder `like`, written as a Hugging Face folder."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    hidden, layers, heads, kv = (int(x) for x in shape.split("x"))
    tokenizer = AutoTokenizer.from_pretrained(ROOT / like)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                         max_position_embeddings=256, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    print(f"random Qwen2 {shape}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters -> {folder}")
    return folder


# --------------------------------------------------------------------------- rolegraph side


def run_rolegraph(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    steps = args.warmup + args.steps
    run = timed_run(torchrun(args.nproc, "-m", "launch.train", "--config", args.config,
                             f"run.output_dir={out}", *equal_settings(steps, bf16=args.bf16), *args.overrides))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("step", 0) > args.warmup and "timing_s/step" in r]
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    phases = sorted({k for r in train for k in r if k.startswith("timing_s/")} - {
        "timing_s/elapsed", "timing_s/step", "timing_s/eval"})
    return {"step_s": [r["timing_s/step"] for r in train], "accuracy_start": evals[0], "accuracy": evals[-1],
            "phases": {k.removeprefix("timing_s/"): statistics.median(r.get(k, 0.0) for r in train) for k in phases},
            "reward_mean": [r["reward/mean"] for r in rows if "reward/mean" in r],
            "other_cpu_share": run["other_cpu_share"], "wall_s": run["wall_s"]}


# --------------------------------------------------------------------------- TRL side


def trl_worker(args: argparse.Namespace) -> None:
    """One torchrun process of the TRL run: train, save the model, write the step times."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from core.config import load_config
    from core.data import PromptDataset, ShardedSampler
    from launch.config import JobConfig
    from launch.tasks import build_task
    from roles.reward.role import scorer_name
    from roles.reward.scorers import get_scorer

    cfg = load_config(JobConfig, ROOT / args.config,
                      [*equal_settings(args.warmup + args.steps, bf16=args.bf16), *args.overrides])
    tokenizer = AutoTokenizer.from_pretrained(ROOT / cfg.model.path)
    task = build_task(cfg.data.task)
    data = PromptDataset(task.train, tokenizer, max_prompt_len=cfg.data.max_prompt_len)
    steps, per_step = cfg.run.steps, cfg.data.prompts_per_step
    order = list(ShardedSampler(len(data), rank=0, world_size=1, seed=cfg.run.seed))[:steps * per_step]
    rows = [data.rows[i] for i in order]
    dataset = Dataset.from_list([{"prompt": r.prompt, "ground_truth": str(r.answer), "data_source": r.data_source}
                                 for r in rows])

    def reward(completions: list[str], ground_truth: list[str], data_source: list[str], **_: Any) -> list[float]:
        return [float(get_scorer(scorer_name(cfg.reward, s))(c, g))
                for c, g, s in zip(completions, ground_truth, data_source)]

    world = int(os.environ.get("WORLD_SIZE", "1"))
    a, ro = cfg.actor, cfg.rollout
    schedule = {"constant": ("constant", {}), "linear": ("linear", {}),
                "cosine": ("cosine_with_min_lr", {"min_lr_rate": a.min_lr_ratio})}[a.lr_schedule]
    config = GRPOConfig(
        output_dir=str(args.trl_out), max_steps=steps, per_device_train_batch_size=per_step * ro.n // world,
        gradient_accumulation_steps=1, steps_per_generation=1, num_generations=ro.n, num_iterations=1,
        max_completion_length=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
        beta=0.0, loss_type="dapo", epsilon=0.2, scale_rewards="group", learning_rate=a.lr,
        lr_scheduler_type=schedule[0], lr_scheduler_kwargs=schedule[1], warmup_steps=a.warmup_steps,
        adam_beta1=a.betas[0], adam_beta2=a.betas[1], weight_decay=a.weight_decay, max_grad_norm=a.grad_clip,
        gradient_checkpointing=False, use_cpu=True, bf16=args.bf16, shuffle_dataset=False, seed=cfg.run.seed,
        logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    model = AutoModelForCausalLM.from_pretrained(ROOT / cfg.model.path, dtype=torch.float32)
    times: dict[str, list[float]] = {"step": [], "generate_and_score": []}

    class StepTimes(TrainerCallback):
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.t0 = time.perf_counter()

        def on_step_end(self, *_: Any, **__: Any) -> None:
            times["step"].append(time.perf_counter() - self.t0)

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[StepTimes()])
    generate = trainer._generate_and_score_completions

    def timed_generate(*a: Any, **k: Any) -> Any:
        t0 = time.perf_counter()
        out = generate(*a, **k)
        times["generate_and_score"].append(time.perf_counter() - t0)
        return out
    trainer._generate_and_score_completions = timed_generate  # type: ignore[method-assign]
    trainer.train()
    if int(os.environ.get("RANK", "0")) == 0:
        trainer.save_model(str(args.trl_out / "model"))
        tokenizer.save_pretrained(args.trl_out / "model")
        (args.trl_out / "times.json").write_text(json.dumps(times))


def trl_accuracy(args: argparse.Namespace, model_dir: Path) -> float:
    """Held-out greedy accuracy of the TRL model, by rolegraph's evaluator (one process)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core import dist
    from core.config import load_config
    from launch.config import JobConfig
    from launch.evaluate import held_out_accuracy
    from launch.tasks import build_task
    from roles.reward import Reward
    from roles.rollout.role import Rollout
    from roles.rollout.torch_engine import TorchEngine

    cfg = load_config(JobConfig, ROOT / args.config, [*equal_settings(1), *args.overrides])
    dist.init_distributed(device="cpu")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = TorchEngine(model, pad_token_id=tokenizer.pad_token_id, device=torch.device("cpu"))
    rollout = Rollout(cfg.rollout, engine, tokenizer, seed=0, rank=0)
    task = build_task(cfg.data.task)
    return held_out_accuracy(task.eval, rollout=rollout, reward=Reward(cfg.reward), tokenizer=tokenizer,
                             batch_size=cfg.eval.batch_size, max_new_tokens=cfg.rollout.max_new_tokens,
                             max_prompt_len=cfg.data.max_prompt_len)["eval/accuracy"]


def run_trl(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    run = timed_run(torchrun(args.nproc, str(Path(__file__).resolve()), "--worker", "--trl-out", str(out),
                             "--config", args.config, "--steps", str(args.steps), "--warmup", str(args.warmup),
                             *(["--bf16"] if args.bf16 else []), *args.overrides, python=args.trl_python))
    times = json.loads((out / "times.json").read_text())
    step, gen = times["step"][args.warmup:], times["generate_and_score"][args.warmup:]
    scored = timed_run([args.trl_python, str(Path(__file__).resolve()), "--accuracy", str(out / "model"),
                        "--config", args.config, *args.overrides])
    acc = json.loads(scored["stdout"].strip().splitlines()[-1])
    return {"step_s": step, "accuracy": acc,
            "phases": {"generate_and_score": statistics.median(gen),
                       "rest (forward, backward, optimizer)": statistics.median(s - g for s, g in zip(step, gen))},
            "other_cpu_share": run["other_cpu_share"], "wall_s": run["wall_s"]}


# --------------------------------------------------------------------------- the comparison


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--steps", type=int, default=10, help="timed steps (after the warm-up)")
    ap.add_argument("--warmup", type=int, default=2, help="steps run first and not timed")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--sides", default="rolegraph,trl")
    ap.add_argument("--bf16", action="store_true",
                    help="bfloat16 compute on both sides (reported apart from the equal-settings fp32 ratio)")
    ap.add_argument("--shape", help="a random Qwen2 of this shape (hidden x layers x heads x kv, e.g. 384x8x6x2) "
                                    "with the config's tokenizer, instead of model.path")
    ap.add_argument("--trl-python", default=sys.executable, help="interpreter with trl installed")
    ap.add_argument("--out", type=Path, help="JSON results")
    ap.add_argument("--work", type=Path, help="keep both runs' folders here (default: a temporary folder)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--trl-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--accuracy", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides for both sides, e.g. rollout.max_new_tokens=32")
    args = ap.parse_args(argv)
    if args.worker:
        trl_worker(args)
        return {}
    if args.accuracy:
        print(json.dumps(trl_accuracy(args, args.accuracy)))
        return {}
    results: dict[str, Any] = {"config": args.config, "overrides": list(args.overrides), "nproc": args.nproc,
                               "bf16": args.bf16,
                               "steps": args.steps, "warmup": args.warmup,
                               "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as tmp:
        work = args.work or Path(tmp)
        if args.shape:
            from core.config import load_config
            from launch.config import JobConfig
            like = load_config(JobConfig, ROOT / args.config, args.overrides).model.path
            args.overrides.append(f"model.path={random_model(args.shape, like, work / 'model')}")
            results["shape"] = args.shape
        for side in args.sides.split(","):
            results[side] = (run_rolegraph if side == "rolegraph" else run_trl)(args, work / side)
            results[side]["median_step_s"] = statistics.median(results[side]["step_s"])
    sides = [s for s in ("rolegraph", "trl") if s in results]
    for s in sides:
        r = results[s]
        busy = " BUSY" if r["other_cpu_share"] > BUSY_SHARE else ""
        print(f"{s:10s} {r['median_step_s']:.3f} s/step (median of {len(r['step_s'])}), held-out accuracy "
              f"{r['accuracy']:.3f}, other processes {100 * r['other_cpu_share']:.0f}% of the CPU{busy}")
        for k, v in r["phases"].items():
            print(f"    {k:40s} {v:.4f} s")
    if len(sides) == 2:
        results["ratio"] = results["trl"]["median_step_s"] / results["rolegraph"]["median_step_s"]
        results["busy"] = any(results[s]["other_cpu_share"] > BUSY_SHARE for s in sides)
        print(f"TRL / rolegraph: {results['ratio']:.2f}x per step" + (" (machine busy: do not use)"
                                                                      if results["busy"] else ""))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
