"""tools/gpu_check.py and tools/gpu_wheels.sh, the two calls of a GPU window (docs/gpu.md).

The check runs on CPU at tiny sizes: every stage passes here, and a stage that raises or hangs is
recorded while the next one still runs. The wheel set is installed offline next to the GPU
image's packages only (taken from this environment: torch here is the CPU build) and the whole
check runs from there, which proves the set complete.
"""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(gpu_check)  # tools/ is not a package; the stage table is read from it

IMAGE = ["torch", "transformers", "tokenizers", "safetensors", "pyyaml", "numpy", "pyarrow", "tqdm",
         "peft", "accelerate", "pytest"]
"""The GPU machine's image (docs/gpu.md); their requirements come with them."""
NEEDS_MLFLOW = {"core.mlflow_store": "ModuleNotFoundError: No module named 'mlflow'"}
"""The one module that may not import in the image: the MLflow side of tracking, loaded only
when tracking is on (the GPU check runs with tracking.enabled=false)."""


def run_check(out: Path, *args: str, python: str = sys.executable, env: dict | None = None,
              timeout: float = 900) -> tuple[subprocess.CompletedProcess, dict]:
    proc = subprocess.run([python, "tools/gpu_check.py", "--device", "cpu", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=env or {**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    assert (out / "gpu_check.json").exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "gpu_check.json").read_text())


def assert_reports_cover_every_stage(out: Path, report: dict, names: list[str]) -> None:
    """Both files exist; each stage is in both, with a figure or an error."""
    md_text = (out / "gpu_check.md").read_text()
    assert [s["name"] for s in report["stages"]] == names
    assert report["finished"] and report["seconds"] > 0
    for s in report["stages"]:
        assert s.get("figures") or s.get("error"), s
        assert re.search(rf"^\| {s['name']} \| {s['status']} \|", md_text, re.M), s["name"]
        assert f"## {s['name']}: {s['status']}" in md_text


@pytest.mark.dist
@pytest.mark.slow
def test_cpu_check_runs_every_stage_and_writes_both_reports(tmp_path):
    out = tmp_path / "check"
    proc, report = run_check(out)
    assert_reports_cover_every_stage(out, report, list(gpu_check.BY_NAME))
    status = {s["name"]: s["status"] for s in report["stages"]}
    assert set(status.values()) == {"passed"}, {n: s.get("error") or s["checks"] for n, s in
                                                zip(status, report["stages"]) if s["status"] != "passed"}
    assert proc.returncode == 0
    fig = {s["name"]: s["figures"] for s in report["stages"]}
    # the figures are measurements, consistent with each other
    assert fig["fsdp_bf16"]["backend"] == "gloo" and 0 < fig["fsdp_bf16"]["grad_rel_l2_error"] < 0.05
    assert fig["weight_sync"]["bytes"] == 2 * fig["weight_sync"]["params"] > 0
    assert fig["torch_engine"]["static/tokens"] == fig["torch_engine"]["growing/tokens"] > 0
    assert fig["bench"]["step_s"] > 0 and fig["bench"]["device"] == "cpu"
    assert fig["train"]["eval_accuracy_last"] > fig["train"]["eval_accuracy_first"]
    assert all(s["seconds"] < s["timeout_s"] for s in report["stages"])


def test_a_stage_that_raises_or_hangs_is_recorded_and_the_next_still_runs(tmp_path):
    """max_new_tokens=0 makes the engine's SamplingParams raise; a 1 s timeout kills a stage
    that is still importing torch; the environment stage after them passes."""
    out = tmp_path / "check"
    proc, report = run_check(out, "--stages", "torch_engine,fsdp_bf16,environment",
                             "--set", "torch_engine.new_tokens=0", "--set", "fsdp_bf16.timeout_s=1")
    assert proc.returncode == 1
    assert_reports_cover_every_stage(out, report, ["torch_engine", "fsdp_bf16", "environment"])
    raised, hung, env = report["stages"]
    assert raised["status"] == "error" and "max_new_tokens and n must be >= 1" in raised["error"], raised
    assert "SamplingParams" in raised["traceback"] and raised["params"]["new_tokens"] == 0
    assert hung["status"] == "timeout" and "timed out after 1 s" in hung["error"], hung
    assert hung["seconds"] < 20  # killed, not waited for
    assert env["status"] == "passed" and env["figures"]["torch"], env
    assert "max_new_tokens and n must be >= 1" in (out / "gpu_check.md").read_text()


def test_a_stopped_check_kills_its_stage_and_leaves_both_reports(tmp_path):
    """SIGTERM to the check while a stage runs: the stage's process group is killed, the
    reports say so, later stages stay pending."""
    out = tmp_path / "check"
    proc = subprocess.Popen([sys.executable, "tools/gpu_check.py", "--device", "cpu", "--out", str(out),
                             "--stages", "fsdp_bf16,environment"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    started = out / "stages" / "fsdp_bf16" / "result.json"  # the stage's own process is up
    deadline = time.monotonic() + 60
    while not started.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130, proc.stdout.read()
    report = json.loads((out / "gpu_check.json").read_text())
    stopped, later = report["stages"]
    assert stopped["status"] == "interrupted" and later["status"] == "pending" and not report["finished"]
    with pytest.raises(ProcessLookupError):
        os.killpg(stopped["pid"], 0)  # nothing of the stage is left running
    assert "| fsdp_bf16 | interrupted |" in (out / "gpu_check.md").read_text()


def test_stages_past_the_time_budget_are_skipped_and_recorded(tmp_path):
    proc, report = run_check(tmp_path, "--stages", "environment,train", "--budget-s", "5")
    assert proc.returncode == 1
    assert [(s["name"], s["status"]) for s in report["stages"]] == [("environment", "skipped"), ("train", "skipped")]
    assert_reports_cover_every_stage(tmp_path, report, ["environment", "train"])
    assert "time budget of 5 s spent" in report["stages"][0]["error"]


def test_unknown_stage_keys_are_refused_with_the_valid_ones(tmp_path):
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--out", str(tmp_path), "--device", "cpu",
                           "--set", "bench.stepz=3"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "stage bench has no 'stepz'; keys: timeout_s, shape" in proc.stderr
    assert not (tmp_path / "gpu_check.json").exists()


# --- the wheel set ------------------------------------------------------------------------------

def _key(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_closure(names: list[str]) -> dict[str, md.Distribution]:
    """The installed distributions `names` and everything they require (no extras), by key."""
    seen: dict[str, md.Distribution] = {}
    todo = list(names)
    while todo:
        name = todo.pop()
        if _key(name) in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # a requirement for another platform or Python
            continue
        seen[_key(name)] = dist
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _top_levels(dist: md.Distribution) -> set[str]:
    return {f.parts[0] for f in dist.files or [] if f.parts[0] not in ("..", "__pycache__")}


def image_site_packages(dest: Path) -> set[str]:
    """Symlinks in `dest` to the image's packages as installed here, and nothing else; returns
    the distribution keys. A top-level folder shared with another distribution (a namespace
    package) becomes a real folder holding only the image's entries."""
    image = requirement_closure(IMAGE)
    owners: dict[str, set[str]] = {}
    for dist in md.distributions():
        for top in _top_levels(dist):
            owners.setdefault(top, set()).add(_key(dist.metadata["Name"]))
    for key, dist in image.items():
        site = Path(dist.locate_file(""))
        for top in _top_levels(dist):
            src = site / top
            if not src.exists() or (dest / top).exists():
                continue
            if owners[top] <= set(image):
                (dest / top).symlink_to(src)
                continue
            (dest / top).mkdir()
            for f in dist.files:
                if f.parts[0] == top and len(f.parts) > 1 and not (dest / top / f.parts[1]).exists():
                    (dest / top / f.parts[1]).symlink_to(site / top / f.parts[1])
    return set(image)


def isolated_python(tmp_path: Path) -> tuple[Path, set[str]]:
    """An interpreter whose site-packages holds only the image's packages."""
    env_dir = tmp_path / "image-env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    site = next(env_dir.glob("lib/python*/site-packages"))
    return env_dir / "bin" / "python", image_site_packages(site)


def project_modules() -> list[str]:
    return sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                  for pkg in ("core", "roles", "algorithms", "launch") for p in (ROOT / pkg).rglob("*.py"))


IMPORT_ALL = """
import importlib, json, sys
errors = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception as e:
        errors[name] = f"{type(e).__name__}: {e}"
where = {}
for name in ("torch", "torchdata", "math_verify", "latex2sympy2_extended", "antlr4", "transformers", "mlflow"):
    try:
        where[name] = importlib.import_module(name).__file__
    except ImportError:
        where[name] = None
print(json.dumps({"errors": errors, "where": where, "path": sys.path}))
"""


@pytest.mark.dist  # its gpu_check run starts torchrun (bench, train)
@pytest.mark.slow
def test_gpu_wheels_complete_the_image_offline(tmp_path):
    """gpu_wheels.sh downloads at most 60 MiB, nothing the image has; installed with --no-index
    --no-deps --target next to the image's packages only, every module of core/, roles/,
    algorithms/ and launch/ imports and tools/gpu_check.py --device cpu passes."""
    wheels, target = tmp_path / "wheels", tmp_path / "deps"
    proc = subprocess.run(["bash", "tools/gpu_wheels.sh", str(wheels)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    files = sorted(wheels.glob("*.whl"))
    total = sum(f.stat().st_size for f in files)
    assert f"total: {len(files)} wheels, {total} bytes" in proc.stdout and 0 < total <= 60 * 2**20
    image = requirement_closure(IMAGE)
    needed = set(requirement_closure(["rolegraph"])) - set(image)
    got = {_key(f.name.split("-")[0]) for f in files}
    assert len(got) == len(files) and got <= needed, (got, needed)  # no duplicate, nothing extra
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                    "--target", str(target), *map(str, files)], check=True, timeout=300)

    python, _ = isolated_python(tmp_path)
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", str(tmp_path)),
           "PYTHONPATH": str(target), "PYTHONNOUSERSITE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(python), "-c", IMPORT_ALL, *project_modules()], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    where = found["where"]
    assert where["mlflow"] is None and not any(".venv" in p for p in found["path"])  # truly isolated
    assert all(where[m].startswith(str(target)) for m in ("torchdata", "math_verify", "antlr4"))
    assert where["torch"].startswith(str(python.parents[1]))
    assert found["errors"] == NEEDS_MLFLOW

    proc, report = run_check(tmp_path / "check", python=str(python), env=env)
    assert_reports_cover_every_stage(tmp_path / "check", report, list(gpu_check.BY_NAME))
    assert {s["name"]: s.get("error") or s["checks"] for s in report["stages"] if s["status"] != "passed"} == {}
    assert proc.returncode == 0 and report["stages"][0]["figures"]["torchdata"] == md.version("torchdata")
