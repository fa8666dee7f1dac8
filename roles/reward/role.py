"""The reward role: per-sample scores from rule scorers chosen by data source.

Scoring runs in-process (`workers: 0`, for cheap scorers such as the built-in task's) or in a
pool of worker processes with per-sample limits. Either way a scorer that raises or runs out of
time yields 0 for that sample and is counted (`reward/errors`, `reward/timeouts`); training never
stops because of a scorer, only because the code sandbox cannot start here (roles/reward/sandbox/__init__.py:
`SandboxUnavailable`, unless `sandbox.allow_weak`; weak samples count as `reward/sandbox_weak`).

In the pool each worker scores one sample at a time. Two limits apply per sample: CPU time in the
worker (`timeout_s`, a SIGVTALRM timer, separate from the wall-clock alarm math-verify uses for
its own limits), and wall-clock time however it is spent (`wall_timeout_s`: sleeping, stuck in C
code, a sandbox run), watched by the parent: past it only that sample's worker is killed (its
sandbox dies with it, `--die-with-parent`, and its cgroups are removed) and replaced, and only
that sample counts as a timeout.
"""
from __future__ import annotations

import collections
import logging
import math
import multiprocessing as mp
import multiprocessing.connection
import signal
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from core.batch import Batch
from core.config import RangeError, above, at_least
from core.graph import Phase, Result
from roles.reward import code_scorer
from roles.reward.sandbox import SandboxConfig, SandboxUnavailable, isolation, weak_samples
from roles.reward.sandbox import cgroup as sandbox_cgroup
from roles.reward.scorers import Scorer, get_scorer, register_scorer, scorer_names  # noqa: F401  (public API)

logger = logging.getLogger(__name__)

ERROR, TIMEOUT = "error", "timeout"


class Reward:
    phase: ClassVar[Phase] = Phase.ANY
    """Scoring runs on the CPU, in either device phase."""

    @dataclass(kw_only=True, slots=True)
    class Config:
        scorer: str | None = None
        """Scorer for every sample; None: the scorer named by each sample's data_source."""
        source_scorers: dict[str, str] = field(default_factory=dict)
        """Per data_source scorer names, e.g. {gsm8k: math}; overrides `scorer`."""
        workers: int = 0
        """Scoring processes; 0 scores in this process (no time limit beyond the scorer's own)."""
        timeout_s: float = 10.0
        """CPU seconds one sample may take in a worker before it scores 0."""
        wall_timeout_s: float | None = None
        """Wall-clock seconds one sample may take in a worker, however spent; past it only that
        sample's worker is replaced and the sample scores 0. None: 2 x timeout_s plus
        sandbox.wall_seconds."""
        sandbox: SandboxConfig = field(default_factory=SandboxConfig)
        """Isolation and per-sample limits of the `code` scorer's sandbox (roles/reward/sandbox/__init__.py)."""

        env_weight: float = 1.0
        """Weight of a sample's environment reward (rollout.tools.env, roles/rollout/environments.py)
        in its score: score = scorer + env_weight * env_reward; with an environment both parts
        are logged (reward/scorer, reward/env). reward.scorer=none leaves the environment's alone."""

        nonfinite_score: float = 0.0
        """Score of a sample whose scorer returned NaN or +-inf (counted as reward/nonfinite):
        a broken scorer never puts a non-finite value into rewards and advantages."""

        def __post_init__(self) -> None:
            at_least(self, 0, "workers")
            for name in ("nonfinite_score", "env_weight"):
                if not math.isfinite(getattr(self, name)):
                    raise RangeError(name, "a finite number", getattr(self, name))
            above(self, 0, "timeout_s", "wall_timeout_s")

    def __init__(self, cfg: Config, *, device: torch.device | str = "cpu", environment: bool = False) -> None:
        """`environment`: the rollout has one (its rewards are then logged apart from the scorer's)."""
        self.cfg = cfg
        self.device = torch.device(device)
        self.environment = environment
        names = {n for n in (cfg.scorer, *cfg.source_scorers.values()) if n is not None}
        for name in names:
            get_scorer(name)  # fail at start-up on a typo, not at step 1
        code_scorer.configure(cfg.sandbox)
        if "code" in names:
            isolation(cfg.sandbox)  # no sandbox here: fail now, naming the missing piece
        wall = (2 * cfg.timeout_s + cfg.sandbox.wall_seconds if cfg.wall_timeout_s is None
                else cfg.wall_timeout_s)
        self._pool = (ScoringPool(cfg.workers, cfg.timeout_s, wall_timeout_s=wall,
                                  sandbox=cfg.sandbox) if cfg.workers > 0 else None)

    def scorer_for(self, data_source: str) -> str:
        return scorer_name(self.cfg, data_source)

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless between steps

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def sharded_state(self) -> None:
        return None

    def score(self, batch: Batch) -> Result:
        """scores [B] float32: the scorer's, for response_text against ground_truth, plus
        env_weight x env_reward (where the batch has it)."""
        jobs = [(get_scorer(self.scorer_for(src)), text, truth)
                for text, truth, src in zip(batch.response_text, batch.ground_truth, batch.data_source)]
        weak_before = weak_samples()
        outcomes, weak = (self._pool.map(jobs) if self._pool
                          else ([score_one(*job) for job in jobs], 0))
        values = [o if isinstance(o, float) else 0.0 for o in outcomes]
        nonfinite = [i for i, v in enumerate(values) if not math.isfinite(v)]
        for i in nonfinite:
            values[i] = self.cfg.nonfinite_score
        if nonfinite:
            logger.warning("%d of %d scores were NaN or inf; scored %s instead (reward.nonfinite_score)",
                           len(nonfinite), len(values), self.cfg.nonfinite_score)
        counts = {"reward/errors": float(sum(o == ERROR for o in outcomes)),
                  "reward/timeouts": float(sum(o == TIMEOUT for o in outcomes)),
                  "reward/nonfinite": float(len(nonfinite))}
        if weak := weak + weak_samples() - weak_before:  # only where allow_weak let them run
            counts["reward/sandbox_weak"] = float(weak)
        scores = torch.tensor(values, dtype=torch.float32, device=self.device)
        metrics: dict[str, float] = {}
        if "env_reward" in batch:
            env = batch.env_reward.to(device=self.device, dtype=torch.float32)
            if self.environment:
                metrics = {"reward/scorer": float(scores.double().mean()), "reward/env": float(env.double().mean())}
            scores = scores + self.cfg.env_weight * env
        return Result(scores, metrics=metrics, counts=counts)


def scorer_name(cfg: Reward.Config, data_source: str) -> str:
    """The scorer a sample of `data_source` is scored by under `cfg`."""
    return cfg.source_scorers.get(data_source) or cfg.scorer or data_source


def has_scorer(cfg: Reward.Config, data_source: str) -> bool:
    """Whether samples of `data_source` have a registered scorer (prompt files check it at load)."""
    return scorer_name(cfg, data_source) in scorer_names()


def score_one(scorer: Scorer, text: str, truth: Any) -> float | str:
    """A float, or ERROR when the scorer raised (logged), or TIMEOUT."""
    try:
        return float(scorer(text, truth))
    except _SampleTimeout:
        return TIMEOUT
    except SandboxUnavailable:
        raise  # the machine cannot score code at all: stop, do not train on zeros
    except Exception:  # a scorer bug must never stop training
        logger.exception("scorer %s raised; reward 0", getattr(scorer, "__name__", scorer))
        return ERROR


class _SampleTimeout(BaseException):
    """Not an Exception, so a scorer's own `except Exception` cannot swallow it."""


def _on_cpu_limit(signum: int, frame: Any) -> None:
    raise _SampleTimeout()


def _score_limited(scorer: Scorer, text: str, truth: Any, limit_s: float) -> float | str:
    """Worker side: score one sample under a CPU-time timer."""
    signal.signal(signal.SIGVTALRM, _on_cpu_limit)
    signal.setitimer(signal.ITIMER_VIRTUAL, limit_s)
    try:
        return score_one(scorer, text, truth)
    except _SampleTimeout:  # fired outside the scorer's own try
        return TIMEOUT
    finally:
        signal.setitimer(signal.ITIMER_VIRTUAL, 0)


class ScoringPool:
    """Worker processes scoring one sample each at a time, under per-sample CPU and wall limits.

    Forkserver workers: no copy of the trainer's threads or CUDA state. The forkserver's socket
    lives in the trainer's /tmp, which no sandbox can see (roles/reward/sandbox/bwrap.py). Each worker
    has up to PREFETCH samples sent ahead (so it does not wait for the parent between samples);
    a sample's wall clock starts when its worker begins it: when the worker is free, or when it
    reports the sample before. When a worker is replaced, the samples it had not begun go to
    the others, uncharged. Start-up (imports) is never charged to a sample.
    """

    PREFETCH = 8
    """Samples sent ahead per worker while many are left (near the end: fewer, for balance)."""
    START_TIMEOUT_S = 300.0
    """How long a new worker may take to start (import the scorers) before it is replaced."""

    def __init__(self, workers: int, timeout_s: float, *, wall_timeout_s: float,
                 sandbox: SandboxConfig | None = None) -> None:
        for name, value in (("workers", workers), ("timeout_s", timeout_s),
                            ("wall_timeout_s", wall_timeout_s)):
            if not value > 0:
                raise ValueError(f"reward.{name} must be > 0 for a scoring pool, got {value!r}")
        self.workers, self.timeout_s, self.wall_timeout_s = workers, timeout_s, wall_timeout_s
        self.sandbox = sandbox or SandboxConfig()
        self._live: list[_Worker] = []

    def map(self, jobs: list[tuple[Scorer, str, Any]]) -> tuple[list[float | str], int]:
        """Outcomes in job order, and how many samples ran in the sandbox's weak mode."""
        try:
            return self._map(jobs)
        except BaseException:  # SandboxUnavailable, Ctrl-C: no worker left mid-sample
            self.close()
            raise

    def _map(self, jobs: list[tuple[Scorer, str, Any]]) -> tuple[list[float | str], int]:
        while len(self._live) < self.workers:
            self._live.append(self._start())
        outcomes: list[float | str] = [TIMEOUT] * len(jobs)
        todo = collections.deque(range(len(jobs)))
        weak, failed_starts = 0, 0
        while todo or any(w.sent for w in self._live):
            ahead = min(self.PREFETCH, 1 + len(todo) // self.workers)
            for worker in self._live:
                while worker.ready and len(worker.sent) < ahead and todo:
                    index = todo.popleft()
                    worker.send(index, jobs[index])
            waiting = [w for w in self._live if w.sent or not w.ready]
            wait_s = min(w.deadline(self.wall_timeout_s, self.START_TIMEOUT_S)
                         for w in waiting) - time.monotonic()
            ready = set(mp.connection.wait([x for w in waiting for x in (w.conn, w.sentinel)],
                                           timeout=max(0.0, wait_s)))
            for worker in waiting:
                for index, outcome, weak_runs in worker.poll(ready, self.wall_timeout_s,
                                                             self.START_TIMEOUT_S):
                    outcomes[index] = outcome
                    weak += weak_runs
                if worker.dead:
                    failed_starts += not worker.ready
                    if failed_starts > 3 * self.workers:
                        raise RuntimeError("scoring workers die while starting; see the log")
                    todo.extendleft(reversed(worker.sent))  # not begun: not charged
                    worker.kill()
                    self._live[self._live.index(worker)] = self._start()
        return outcomes, weak

    def _start(self) -> _Worker:
        return _Worker.start(self.timeout_s, self.sandbox)

    def close(self) -> None:
        for worker in self._live:
            worker.kill()
        self._live = []


@dataclass(slots=True)
class _Worker:
    """One scoring process and the samples sent to it."""

    process: Any
    conn: Any
    born: float
    ready: bool = False
    """Started up (sent its first message)."""
    sent: collections.deque[int] = field(default_factory=collections.deque)
    """Samples sent and not yet scored; the first is the one it is on."""
    started: float = 0.0
    """When it began the first of ``sent``."""
    dead: bool = False
    """Killed at a limit, or died: to be replaced (``sent`` then holds what it never began)."""

    @property
    def sentinel(self) -> int:
        return self.process.sentinel

    @classmethod
    def start(cls, timeout_s: float, sandbox: SandboxConfig) -> _Worker:
        ctx = mp.get_context("forkserver")
        # Imported once in the forkserver, so a replacement worker starts in milliseconds
        # (effective only before the forkserver starts; nothing here touches CUDA).
        ctx.set_forkserver_preload(["roles.reward"])
        conn, child = ctx.Pipe()
        process = ctx.Process(target=_worker_main, args=(child, timeout_s, sandbox), daemon=True)
        process.start()
        child.close()
        return cls(process=process, conn=conn, born=time.monotonic())

    def send(self, index: int, job: tuple[Scorer, str, Any]) -> None:
        if not self.sent:
            self.started = time.monotonic()
        self.sent.append(index)
        self.conn.send(job)

    def deadline(self, wall_timeout_s: float, start_timeout_s: float) -> float:
        return self.started + wall_timeout_s if self.ready else self.born + start_timeout_s

    def poll(self, ready: set[Any], wall_timeout_s: float,
             start_timeout_s: float) -> list[tuple[int, float | str, int]]:
        """(sample, outcome, weak runs) of what it finished; marks the worker dead if it is."""
        done: list[tuple[int, float | str, int]] = []
        died = False
        while self.conn in ready and not died and self.conn.poll():
            try:
                kind, value, weak_runs = self.conn.recv()
            except (EOFError, OSError):
                died = True
                break
            if kind == "unavailable":
                raise SandboxUnavailable(value)
            if kind == "ready":
                self.ready = True
            elif kind == "ok":
                done.append((self.sent.popleft(), value, weak_runs))
                self.started = time.monotonic()  # it goes on with the next one sent
        died = died or self.sentinel in ready and not self.conn.poll()
        expired = (bool(self.sent) or not self.ready) and time.monotonic() >= self.deadline(
            wall_timeout_s, start_timeout_s)
        if not (died or expired):
            return done
        self.dead = True
        if not self.ready:
            logger.error("scoring worker %d did not start", self.process.pid)
        elif died and self.sent:
            logger.error("scoring worker %d died while scoring a sample; reward 0",
                         self.process.pid)
            done.append((self.sent.popleft(), ERROR, 0))
        elif died:
            logger.error("scoring worker %d died between samples", self.process.pid)
        else:
            logger.warning("a sample ran past its %.0f s wall-clock limit: replacing its "
                           "scoring worker %d", wall_timeout_s, self.process.pid)
            done.append((self.sent.popleft(), TIMEOUT, 0))
        return done

    def kill(self) -> None:
        """SIGKILL the worker (its sandboxes die with it) and remove its sandboxes' cgroups."""
        pid = self.process.pid
        self.process.kill()
        self.process.join()
        self.conn.close()
        sandbox_cgroup.remove_orphans(owner=pid)


def _worker_main(conn: Any, timeout_s: float, sandbox: SandboxConfig) -> None:
    """Worker loop: score each job under the CPU-time limit, send (kind, outcome, weak runs)."""
    code_scorer.configure(sandbox)
    conn.send(("ready", None, 0))
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        before = weak_samples()
        try:
            scorer, text, truth = job
            outcome = _score_limited(scorer, text, truth, timeout_s)
        except SandboxUnavailable as e:
            conn.send(("unavailable", str(e), 0))
            continue
        conn.send(("ok", outcome, weak_samples() - before))
