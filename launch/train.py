"""Train with RL: `torchrun --nproc_per_node=N -m launch.train --config configs/X.yaml key=value ...`

Each step runs the algorithm's graph once on this rank's prompts. Rank 0 writes one JSON object
per step to <run.output_dir>/metrics.jsonl (step 0 holds the evaluation before training) and
prints one line per step.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from core import dist
from core.batch import Batch
from core.checkpoint import Checkpointer
from core.config import to_dict, to_yaml
from core.curriculum import CurriculumStream, PassRateTracker
from core.data import PROMPT_FIELDS
from core.graph import Graph, Phase, Stage
from core.models import save_hf_folder
from core.optim import NonFiniteError
from core.tracking import Tracker
from launch.build import Job, build_job
from launch.config import JobConfig
from launch.entry import exit_after, run_entry
from launch.eval import flat_summary, run_benchmarks
from launch.evaluate import held_out_accuracy
from launch.runlog import RunLog
from launch.state import load_local_state, local_state, sharded_state

logger = logging.getLogger("launch.train")


def batch_metrics(batch: Batch) -> dict[str, float]:
    """Reward and response-length statistics over the global batch (collective)."""
    lengths = batch.response_mask.sum(-1).double()
    sums = dist.all_reduce_scalars({
        "n": float(len(batch)), "reward": float(batch.rewards.double().sum()),
        "reward_sq": float(batch.rewards.double().square().sum()), "len": float(lengths.sum()),
        "truncated": float(sum(r == "length" for r in batch.finish_reason)),
        "prompt": float(batch.prompt_mask.sum())})
    n = sums["n"]
    mean = sums["reward"] / n
    return {"reward/mean": mean, "reward/std": max(sums["reward_sq"] / n - mean**2, 0.0) ** 0.5,
            "response_length/mean": sums["len"] / n,
            "response_length/max": dist.all_reduce_scalars({"m": float(lengths.max())}, "max")["m"],
            "response_length/clip_ratio": sums["truncated"] / n,
            "perf/response_tokens": sums["len"], "perf/prompt_tokens": sums["prompt"]}


OPTIONAL_ROLES = ("critic", "reference")


def run_config(cfg: JobConfig, used: set[str]) -> dict[str, Any]:
    """The resolved config as config.yaml and MLflow's params show it: every section, except
    those of optional roles the plan does not use (GRPO has no critic) and `rollout.tools`
    without tools or an environment. `--config` on it reruns the same run (a missing section takes its defaults,
    which nothing reads)."""
    tree = to_dict(cfg)
    for role in OPTIONAL_ROLES:
        if role not in used:
            tree.pop(role, None)
    if not cfg.rollout.tools.multi_turn:
        tree["rollout"].pop("tools", None)
    return tree


class Trainer:
    def __init__(self, job: Job) -> None:
        self.job = job
        self.cfg = job.cfg
        self.out = Path(self.cfg.run.output_dir)
        self.log = RunLog(self.out, is_main=dist.info().is_main, total_steps=self.cfg.run.steps)
        self.orders = {g.name: g.order(PROMPT_FIELDS) for g in job.plan.graphs()}
        self.checkpointer = Checkpointer(self.cfg.checkpoint, self.out)
        self.last_batch: Batch | None = None
        self.pass_rates = PassRateTracker()

    @property
    def history(self) -> list[dict[str, float]]:
        return self.log.history

    @property
    def tracker(self) -> Tracker:
        assert self.log.tracker is not None, "the tracker opens when the run starts"
        return self.log.tracker

    def run_eval(self) -> dict[str, float]:
        j = self.job
        switch = j.hybrid.enter(Phase.GENERATE)
        t0 = time.perf_counter()
        m = switch | held_out_accuracy(j.task.eval, rollout=j.roles.rollout, reward=j.roles.reward,
                                       tokenizer=j.tokenizer, batch_size=self.cfg.eval.batch_size,
                                       max_new_tokens=self.cfg.eval.max_new_tokens or self.cfg.rollout.max_new_tokens,
                                       max_prompt_len=self.cfg.data.max_prompt_len)
        if self.cfg.eval.benchmarks:
            m.update(flat_summary(run_benchmarks(j)[1]))
        m["timing_s/eval"] = time.perf_counter() - t0
        return m

    def train_step(self, graph: Graph, step: int | None = None) -> dict[str, float]:
        j = self.job
        t0 = time.perf_counter()
        stage_metrics = self._enter_curriculum_stage(step) if step is not None else {}
        prompts = next(j.stream).to(dist.info().device)
        batch, ran = graph.run(prompts, order=self.orders[graph.name], enter_phase=j.hybrid.enter)
        world = dist.info().world_size
        metrics = {k: v / world for k, v in dist.all_reduce_scalars(ran.metrics).items()}
        metrics.update(dist.all_reduce_scalars(ran.counts))
        metrics.update(batch_metrics(batch))
        metrics["timing_s/step"] = time.perf_counter() - t0
        metrics["perf/tokens_per_s"] = metrics["perf/response_tokens"] / metrics["timing_s/step"]
        metrics["data/epoch"] = float(j.stream.epoch)
        if "scores" in batch:
            self.pass_rates.update(batch.group_ids, batch.scores)
            metrics.update({k: v / world for k, v in
                            dist.all_reduce_scalars(self.pass_rates.metrics()).items()})
        self.last_batch = batch
        return metrics | stage_metrics

    def _enter_curriculum_stage(self, step: int) -> dict[str, float]:
        stream, cur = self.job.stream, self.cfg.data.curriculum
        if not isinstance(stream, CurriculumStream):
            return {}
        stage = stream.stage_at(step)
        stream.set_stage(stage)
        if cur.max_new_tokens:
            self.job.roles.rollout.max_new_tokens = cur.max_new_tokens[stage]
        return {"curriculum/stage": float(stage),
                "curriculum/max_new_tokens": float(self.job.roles.rollout.max_new_tokens)}

    def run_stage(self, stage: Stage) -> None:
        """A stage before training (e.g. value pre-training): rows with "stage" and "stage_step"."""
        history: list[dict[str, float]] = []
        for k in range(1, stage.max_steps + 1):
            history.append(self.train_step(stage.graph))
            self._record(0, {"stage": stage.name, "stage_step": k, **history[-1]})
            if stage.stop is not None and stage.stop(history):
                logger.info("stage %s stopped after %d steps (stop rule met)", stage.name, k)
                break

    def fit(self) -> list[dict[str, float]]:
        try:
            history = self._fit()
        except BaseException as e:
            self.log.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
        self.log.finish("FINISHED")
        return history

    def _fit(self) -> list[dict[str, float]]:
        cfg, plan = self.cfg, self.job.plan
        t_start = time.perf_counter()
        start = self._start()
        try:
            for step in range(start + 1, cfg.run.steps + 1):
                metrics = self.train_step(plan.train, step)
                if step == cfg.run.steps or (cfg.eval.every and step % cfg.eval.every == 0):
                    metrics.update(self.run_eval())
                metrics["timing_s/elapsed"] = time.perf_counter() - t_start
                self._record(step, metrics)
                if self.last_batch is not None and self.tracker.should_log_samples(step):
                    self.tracker.log_samples(sample_rows(self.last_batch, self.tracker.cfg.samples_per_log), step)
                last = step == cfg.run.steps or step == cfg.run.stop_after
                if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                    self.save(step)
                if step == cfg.run.stop_after:
                    logger.info("stopping after step %d (run.stop_after); resume to continue", step)
                    return self.history
        except NonFiniteError as e:
            good = self.checkpointer.newest_verified()
            raise NonFiniteError(f"{e}; the newest verified checkpoint is {good} (resume from it with "
                                 f"run.resume={good})" if good else f"{e}; no checkpoint verifies") from None
        if cfg.checkpoint.export_hf:
            save_hf_folder(self.job.roles.actor.model, self.job.tokenizer, self.out / "hf",
                           is_main=dist.info().is_main)
            self.tracker.set_tags({"export/hf": str((self.out / "hf").resolve())})
        self._summary(time.perf_counter() - t_start)
        return self.history

    def _start(self) -> int:
        """Resume from a checkpoint (returns its step), or start fresh: evaluate the initial
        policy (step 0) and run the algorithm's stages (returns 0)."""
        path = self.checkpointer.start(self.cfg.run.resume)
        graph = {"graph.mmd": "\n\n".join(g.to_mermaid(PROMPT_FIELDS) for g in self.job.plan.graphs()) + "\n"}
        meta: dict[str, Any] | None = None
        local: dict[str, Any] = {}
        if path is not None:
            local, meta = self.checkpointer.load(path, sharded=sharded_state(self.job), verified=True)
        resolved = run_config(self.cfg, self.job.plan.roles())
        self.log.start(resolved, resume_step=meta["step"] if meta else None, files=graph)
        for g in self.job.plan.graphs():
            logger.info("%s", g.to_text(PROMPT_FIELDS))
        self.log.open_tracker(self.cfg.tracking, resolved, files=graph,
                              resume_run_id=meta.get("tracking_run_id") if meta else None)
        if meta is not None:
            load_local_state(self.job, local)
            self.pass_rates.load_state_dict(local["pass_rates"])
            self.job.hybrid.sync_weights(force=True)
            return meta["step"]
        self.job.hybrid.sync_weights(force=True)  # the engine starts from the actor's weights
        self._record(0, self.run_eval())
        for stage in self.job.plan.stages:
            self.run_stage(stage)
        return 0

    def save(self, step: int) -> None:
        local = local_state(self.job) | {"pass_rates": self.pass_rates.state_dict()}
        path = self.checkpointer.save(step, sharded=sharded_state(self.job), local=local,
                                      meta={"config": to_yaml(self.cfg),
                                            "tracking_run_id": self.tracker.run_id})
        self.tracker.set_tags({"checkpoint/latest": str(path.resolve()), "checkpoint/step": str(step)})

    def _record(self, step: int, metrics: Mapping[str, Any]) -> None:
        self.log.record(step, metrics)

    def _summary(self, seconds: float) -> None:
        evals = [r["eval/accuracy"] for r in self.history if "eval/accuracy" in r and "stage" not in r]
        if not evals:
            return
        logger.info("done: %d steps in %.0f s; eval/accuracy %.3f -> %.3f (%+.3f)",
                    self.cfg.run.steps, seconds, evals[0], evals[-1], evals[-1] - evals[0])


def sample_rows(batch: Batch, n: int) -> list[dict[str, object]]:
    """The first n samples of a step as table rows (prompt, response, answer, reward)."""
    return [{"prompt": batch.prompt_text[i], "response": batch.response_text[i],
             "ground_truth": str(batch.ground_truth[i]), "reward": float(batch.rewards[i]),
             "finish_reason": batch.finish_reason[i]} for i in range(min(n, len(batch)))]


def main(argv: Sequence[str] | None = None) -> list[dict[str, float]]:
    return run_entry(JobConfig, lambda cfg: Trainer(build_job(cfg)).fit(), argv,
                     before_init=lambda cfg: cfg.rollout.engine.prepare_process())


if __name__ == "__main__":
    exit_after(main)
