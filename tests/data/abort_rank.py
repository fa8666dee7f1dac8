"""A torchrun target for tests/test_train_e2e.py's retry test: rank 1 dies by SIGABRT.

`run.output_dir=DIR` names the run's folder (created); with `once`, rank 1 aborts only while
DIR/../aborted_once does not exist (it creates it first), so a rerun succeeds."""
import faulthandler
import os
import sys
from pathlib import Path

faulthandler.enable(all_threads=True)
out = Path(next(a.split("=", 1)[1] for a in sys.argv if a.startswith("run.output_dir=")))
out.mkdir(parents=True, exist_ok=True)
marker = out.parent / "aborted_once"
if os.environ.get("RANK") == "1" and not ("once" in sys.argv and marker.exists()):
    marker.touch()
    os.abort()
