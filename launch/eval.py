"""Evaluate a model on benchmarks: `torchrun ... -m launch.eval --config configs/X.yaml
'eval.benchmarks=[aime24,math500]' eval.n=16 'eval.k=[1,4,16]' eval.temperature=0.6 eval.top_p=0.95`.

Takes the model section of any training config (`model.path`, or `eval.checkpoint` for a
training checkpoint), samples with the same engine and scores with the same scorers as training,
and writes `<run.output_dir>/eval/samples.jsonl` (one row per sample) and
`<run.output_dir>/eval/summary.json` (per benchmark: pass@k, avg@k, maj@k; per round when
eval.rounds > 1). The summary goes to MLflow as metrics `eval/<benchmark>/<metric>@k` whose
step is k (so the UI plots accuracy against k), plus the summary and sample tables.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

from core import dist
from core.checkpoint import Checkpointer
from core.config import flatten
from core.data import read_prompts
from core.tracking import Tracker
from launch.build import Job, build_job
from launch.config import JobConfig
from launch.entry import exit_after, run_entry
from launch.evaluate import Sample, run_benchmark, sampling_overrides, summarize
from launch.state import sharded_state
from roles.reward.role import has_scorer
from roles.reward.scorers import extract_answer
from roles.rollout.tools import tool_schemas

logger = logging.getLogger("launch.eval")
DATA_DIR = Path(__file__).resolve().parents[1] / "data"


def benchmark_path(name: str) -> Path:
    """A name of a file in data/ (aime24, math500, ...) or a path."""
    for candidate in (DATA_DIR / f"{name}.jsonl", DATA_DIR / f"{name}.parquet", Path(name)):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in DATA_DIR.glob("*.jsonl"))
    raise FileNotFoundError(f"benchmark {name!r} is neither a file nor one of: {', '.join(known)}")


def run_benchmarks(job: Job) -> tuple[list[Sample], dict[str, dict[str, float]]]:
    """Every eval.benchmarks entry on the current engine weights (collective)."""
    cfg, ev = job.cfg, job.cfg.eval
    overrides = sampling_overrides(ev.temperature, ev.top_p, ev.max_new_tokens)
    samples: list[Sample] = []
    for name in ev.benchmarks:
        path = benchmark_path(name)
        rows = read_prompts(path, cfg.data.format, job.tokenizer,
                            known_source=lambda s: has_scorer(cfg.reward, s),
                            tools=tool_schemas(cfg.rollout.tools.names))
        samples += run_benchmark(Path(name).stem, rows, rollout=job.roles.rollout, reward=job.roles.reward,
                                 tokenizer=job.tokenizer, fmt=cfg.data.format, n=ev.n, rounds=ev.rounds,
                                 batch_size=ev.batch_size, max_prompt_len=cfg.data.max_prompt_len,
                                 sampling_overrides=overrides, extract=extract_answer, seed=cfg.run.seed)
    return samples, summarize(samples, ev.k)


def flat_summary(summary: dict[str, dict[str, float]]) -> dict[str, float]:
    return {f"eval/{bench}/{metric}": value for bench, table in summary.items() for metric, value in table.items()}


def evaluate(cfg: JobConfig) -> dict[str, dict[str, float]]:
    if not cfg.eval.benchmarks:
        raise ValueError("launch.eval needs eval.benchmarks, e.g. 'eval.benchmarks=[aime24,math500]'")
    job = build_job(cfg)
    if cfg.eval.checkpoint:
        Checkpointer(cfg.checkpoint, cfg.run.output_dir).load(Path(cfg.eval.checkpoint), sharded=sharded_state(job))
    job.hybrid.sync_weights(force=True)
    samples, summary = run_benchmarks(job)
    if dist.info().is_main:
        write_results(Path(cfg.run.output_dir) / "eval", samples, summary)
    log_to_mlflow(cfg, samples, summary)
    for bench, table in summary.items():
        logger.info("%s: %s", bench, "  ".join(f"{k} {v:.3f}" for k, v in table.items()))
    return summary


def write_results(out: Path, samples: Sequence[Sample], summary: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples.jsonl").write_text("".join(json.dumps(s.as_row()) + "\n" for s in samples))
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    logger.info("wrote %s and %s", out / "samples.jsonl", out / "summary.json")


def log_to_mlflow(cfg: JobConfig, samples: Sequence[Sample], summary: dict[str, dict[str, float]]) -> None:
    tracker = Tracker(cfg.tracking, output_dir=cfg.run.output_dir, is_main=dist.info().is_main)
    tracker.log_params(flatten(cfg))
    for bench, table in summary.items():
        for metric, value in table.items():
            if "@" in metric:  # pass@4 -> eval/<bench>/pass_at_k at step 4: accuracy against k
                name, k = metric.split("@")
                tracker.log_metrics({f"eval/{bench}/{name}_at_k": value}, int(k))
            if "/round_" in bench:  # multi-round: accuracy against the round
                base, rnd = bench.split("/round_")
                tracker.log_metrics({f"eval/{base}/{metric}_by_round": value}, int(rnd))
    for bench, table in summary.items():
        if "/round_" not in bench:
            tracker.log_metrics({f"eval/{bench}/{m}_by_round": v for m, v in table.items() if "@" in m}, 1)
    tracker.log_samples([{"benchmark": b, **t} for b, t in summary.items()], 0)
    out = Path(cfg.run.output_dir) / "eval" / "samples.jsonl"
    if out.exists():
        tracker.log_artifact(out, "eval")
    tracker.log_text(json.dumps(summary, indent=1), "eval/summary.json")
    tracker.finish()


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    return run_entry(JobConfig, evaluate, argv, before_init=lambda cfg: cfg.rollout.engine.prepare_process())


if __name__ == "__main__":
    exit_after(main)
