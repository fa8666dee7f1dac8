"""The shared shape of every entry point: parse, configure, set up, run, tear down."""
from __future__ import annotations

import atexit
import faulthandler
import logging
import os
import sys
from typing import Callable, Protocol, Sequence, TypeVar

import torch
from transformers.utils import logging as hf_logging

from core import dist
from core.config import load_config, parse_cli, to_yaml


class _RunSection(Protocol):
    @property
    def device(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def log_level(self) -> str: ...


class EntrySchema(Protocol):
    """What the entry shell reads of any launcher's config: its `run` section."""

    @property
    def run(self) -> _RunSection: ...


C = TypeVar("C", bound=EntrySchema)
R = TypeVar("R")
logger = logging.getLogger("launch")


def run_entry(schema: type[C], body: Callable[[C], R], argv: Sequence[str] | None = None, *,
              before_init: Callable[[C], None] | None = None) -> R:
    """Load `schema` from `--config PATH key=value ...`, start logging, run `before_init(cfg)`
    (before CUDA initialises: e.g. the engine's allocator settings), start the process group,
    print the resolved config, run `body(cfg)`, and always destroy the process group.

    The schema must have a `run` section with `device`, `seed` and `log_level`."""
    if not faulthandler.is_enabled():  # a rank killed by SIGABRT/SIGSEGV prints every thread's stack
        faulthandler.enable(all_threads=True)
    path, overrides = parse_cli(sys.argv[1:] if argv is None else argv)
    cfg = load_config(schema, path, overrides)
    dist.setup_logging(getattr(logging, cfg.run.log_level))
    hf_logging.disable_progress_bar()  # "Loading weights" bars per model and rank: noise in a run log
    if before_init is not None:
        before_init(cfg)
    dist.init_distributed(device=cfg.run.device)
    try:
        torch.manual_seed(cfg.run.seed)
        logger.info("resolved config:\n%s", to_yaml(cfg))
        result = body(cfg)
        # Leave together: a rank that tears its gloo group down while another still works
        # (rank 0 writing the HF folder) was seen to abort at exit ("terminate called without
        # an active exception"). Only on success: a failing rank must not wait here.
        dist.barrier()
        return result
    finally:
        dist.destroy()


def exit_after(main: Callable[[], object]) -> None:
    """Run an entry point as its process's `__main__`; once it has succeeded, end the process
    without the interpreter's teardown.

    Teardown destroys what the FSDP-sharded models still hold (device meshes and their
    process groups) in no particular order, and gloo's C++ threads then abort the process
    ("terminate called without an active exception", SIGABRT, with no Python frame left) after
    the run itself finished: 3 of ~50 two-process runs in one CI pass (2026-12-01). The exit
    handlers (the sandbox's cgroup clean-up, MLflow's) and the logs' flush still run; a
    failing run raises as usual, with its traceback and exit status."""
    main()
    atexit._run_exitfuncs()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
