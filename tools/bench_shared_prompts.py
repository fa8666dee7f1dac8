"""Shared prompts on and off, interleaved in one process (issue #19): the actor update and the
torch engine's generation of a real training step, A B A B.

    python tools/bench_shared_prompts.py --config configs/quickstart.yaml --repeats 8

Runs 3 training steps of the config (tools/bench_trl.py's equal settings), then times
`actor.update` on the last step's batch and `engine.generate_requests` on its requests with
sharing on and off in turn (the update changes the weights between repeats; its cost does not
depend on them). Prints the medians, their ratio and the token slots of one micro-batch each way.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    import os

    from algorithms.losses import PolicyLoss
    from launch.build import build_job
    from launch.config import JobConfig
    from launch.entry import run_entry
    from launch.train import Trainer
    from roles.rollout.engine import Request, SamplingParams
    from tools.bench_trl import equal_settings
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
        os.environ.setdefault(k, v)

    def body(cfg: JobConfig) -> dict[str, float]:
        trainer = Trainer(build_job(cfg))
        graph = trainer.job.plan.graphs()[0]
        for _ in range(3):
            trainer.train_step(graph)
        batch = trainer.last_batch
        assert batch is not None
        actor, engine = trainer.job.roles.actor, trainer.job.roles.rollout.engine
        loss = PolicyLoss(agg_mode="token-mean")
        sampling = SamplingParams(temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                                  stop_token_ids=tuple(trainer.job.roles.rollout.stop_token_ids))
        prompts = [tuple(row[m.bool()].tolist()) for row, m in zip(batch.prompt_ids, batch.prompt_mask)]
        requests = [Request(p, sampling.with_seed(i)) for i, p in enumerate(prompts)]
        times: dict[str, list[float]] = {k: [] for k in ("update_on", "update_off", "generate_on", "generate_off")}
        for _ in range(args.repeats):
            for share in (True, False):
                tag = "on" if share else "off"
                actor.train_state.share_prompts = share
                t0 = time.perf_counter()
                actor.update(batch, loss_fn=loss)
                times[f"update_{tag}"].append(time.perf_counter() - t0)
                engine.share_prefill = share
                t0 = time.perf_counter()
                engine.generate_requests(requests)
                times[f"generate_{tag}"].append(time.perf_counter() - t0)
        out = {k: statistics.median(v) for k, v in times.items()}
        out["update_speedup"] = out["update_off"] / out["update_on"]
        out["generate_speedup"] = out["generate_off"] / out["generate_on"]
        for k, v in out.items():
            print(f"{k:18s} {v:.4f}")
        return out

    return run_entry(JobConfig, body, ["--config", args.config, *equal_settings(100), *args.overrides])


if __name__ == "__main__":
    main()
