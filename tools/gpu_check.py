"""One command that turns a short GPU window into the project's first GPU figures.

    python tools/gpu_check.py --out DIR [--device cuda|cpu] [--stages a,b,...] [--set stage.key=value ...]

Runs the stages below in order of value, each in its own subprocess with its own timeout (a
CUDA fault or a hang in one stage cannot take the others down; its process group is killed),
and rewrites DIR/gpu_check.json and DIR/gpu_check.md before the first stage and after every
stage, so a run killed from outside still leaves what it measured. A stage also writes its
figures as it goes (DIR/stages/<name>/result.json), so a stage that times out keeps the figures
it had. Each stage ends `passed` (every check held), `failed` (it ran, a check did not hold),
`error` (it raised: error and traceback recorded), `timeout`, `crashed` (died without a Python
error, e.g. a CUDA abort), `skipped` (the time budget was spent) or `interrupted` (the check was
stopped by SIGTERM or Ctrl-C: the stage is killed, the reports are written, exit code 130).

    environment   torch / CUDA / NCCL / cuDNN / transformers / python versions, device, memory
    fsdp_bf16     process group (NCCL, world 1; gloo on CPU) and the FSDP2 actor with
                  param_dtype=bfloat16: one update on a tiny model against the same update in
                  float32 on CPU (log-probs, loss, gradient, parameters; tolerances in TOLERANCE)
    weight_sync   HybridEngine.sync_weights, FSDP2 -> torch engine, bf16, Qwen2.5-0.5B shape:
                  bytes, seconds, GB/s; engine weights equal the actor's bit for bit
    torch_engine  growing vs static KV cache vs compiled decode (CUDA graphs), greedy, bf16,
                  64 prompts x 512 new tokens at the 0.5B shape: tokens/s each, same tokens?
    offload       one TRAIN -> GENERATE -> TRAIN cycle through the hybrid engine with the
                  memory hand-off: offload/*, memory/*, reshard/* figures
    bench         torchrun -m launch.bench, 0.5B shape, bf16: step time, tokens/s, MFU, GB/s
    train         torchrun -m launch.train, the quickstart for 20 GRPO steps: finite metrics,
                  eval/accuracy rising

With --device cpu the same stages run at tiny sizes (tests/test_gpu_tools.py keeps them working).
CUDA sizes are budgeted for one H100/H200 (docs/gpu.md): each stage has a timeout, and the whole
run has a budget (`--budget-s`, default 440 s on CUDA) that caps every stage's timeout by what
is left, so the run ends within about 8 minutes by construction.

This file imports only the standard library at the top: a stage imports the project (and torch)
inside its own function, so a missing package or a broken module fails that stage, not the
check. Stages use the public entry points: the role classes as tests/ uses them, launch.bench
and launch.train through torchrun.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:  # annotations only: stages import these at run time (see above)
    import torch
    from core.batch import Batch
    from core.dist import DistInfo
    from core.models import ModelConfig
    from roles.actor import Actor
    from roles.rollout.torch_engine import TorchEngine, TorchEngineConfig

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TOLERANCE = {
    "logp_mean_abs": 0.02,
    "logp_max_abs": 0.2,
    "loss_abs": 0.01,
    "grad_rel_l2": 0.05,
    "update_sign_agreement": 0.97,
    "param_max_abs_in_lr": 2.05,
}
"""fsdp_bf16: bf16 (8 significant bits) against float32. Log-probs in nats; the gradient as
||g_bf16 - g_fp32|| / ||g_fp32||; AdamW's first step is lr * g / |g| per element, so parameters
agree where gradient signs agree, and differ by at most 2 lr elsewhere."""

DEFAULT_BUDGET_S = {"cuda": 440.0, "cpu": 600.0}
"""Whole-run budget: every stage's timeout is capped by what is left of it, so a CUDA run ends
within budget + one kill grace (15 s) + report writing: under 8 minutes."""
LOG_TAIL_LINES = 40


# --- the worker side: one stage in its own process ---------------------------------------------

class Report:
    """Figures and checks of one stage, rewritten to disk at every change (a killed stage keeps
    what it measured)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"figures": {}, "checks": {}}
        self._write()

    def figure(self, key: str, value: Any) -> None:
        self.data["figures"][key] = _plain(value)
        self._write()

    def figures(self, values: dict[str, Any], prefix: str = "") -> None:
        self.data["figures"].update({prefix + k: _plain(v) for k, v in values.items()})
        self._write()

    def check(self, name: str, passed: bool, detail: str) -> None:
        self.data["checks"][name] = {"passed": bool(passed), "detail": detail}
        self._write()

    def error(self, exc: BaseException) -> None:
        self.data["error"] = f"{type(exc).__name__}: {exc}"
        self.data["traceback"] = traceback.format_exc()
        self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        tmp.replace(self.path)


def _plain(value: Any) -> Any:
    """JSON-safe: tensors and numpy scalars to Python numbers, non-finite floats to strings."""
    if hasattr(value, "item") and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _torch_device(device: str) -> torch.device:
    import torch
    return torch.device("cuda", 0) if device == "cuda" else torch.device("cpu")


def _sync(device: torch.device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_dist(device: str) -> DistInfo:
    from core import dist
    return dist.init_distributed(device=device)


def _model_config(shape: str, vocab: int) -> ModelConfig:
    """The launch.bench shape `shape` (vocab from the shape, else `vocab`)."""
    from core.models import ModelConfig
    from launch.bench import SHAPES
    return ModelConfig(config={"vocab_size": vocab, **SHAPES[shape]})


def _random_batch(*, seed: int, B: int, P: int, R: int, vocab: int) -> Batch:
    """Left-padded prompts, right-padded responses of varied lengths, random advantages."""
    import torch
    from core.batch import Batch
    g = torch.Generator().manual_seed(seed)
    prompt_len = torch.randint(max(1, P // 2), P + 1, (B,), generator=g)
    resp_len = torch.randint(max(1, R // 2), R + 1, (B,), generator=g)
    prompt_mask = (torch.arange(P)[None] >= P - prompt_len[:, None]).long()
    response_mask = (torch.arange(R)[None] < resp_len[:, None]).long()
    return Batch(prompt_ids=torch.randint(3, vocab, (B, P), generator=g) * prompt_mask,
                 prompt_mask=prompt_mask,
                 response_ids=torch.randint(3, vocab, (B, R), generator=g) * response_mask,
                 response_mask=response_mask,
                 advantages=torch.randn(B, R, generator=g) * response_mask,
                 group_ids=torch.arange(B) // 4)


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().float().cpu()


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: _full(p).clone() for n, p in model.named_parameters()}


def stage_environment(rep: Report, p: dict[str, Any], device: str) -> None:
    import importlib.metadata as md
    import torch
    rep.figures({"python": platform.python_version(), "torch": torch.__version__,
                 "cuda": torch.version.cuda, "cpu_count": os.cpu_count(), "host": platform.node()})
    for dist_name in ("transformers", "tokenizers", "torchdata", "math-verify", "mlflow", "peft", "numpy"):
        try:
            rep.figure(dist_name, md.version(dist_name))
        except md.PackageNotFoundError:
            rep.figure(dist_name, "not installed")
    rep.figure("cuda_available", torch.cuda.is_available())
    if device != "cuda":
        rep.figure("device_name", _cpu_model())
        rep.check("device", True, "cpu requested")
        return
    t0 = time.perf_counter()
    dev = _torch_device(device)
    x = torch.randn(1024, 1024, device=dev, dtype=torch.bfloat16)
    y = (x @ x).float().sum()
    _sync(dev)
    props = torch.cuda.get_device_properties(dev)
    nccl = torch.cuda.nccl.version()  # a tuple in recent releases, an int in old ones
    rep.figures({"cuda_init_s": time.perf_counter() - t0, "device_name": props.name,
                 "device_count": torch.cuda.device_count(),
                 "capability": f"{props.major}.{props.minor}",
                 "memory_gb": props.total_memory / 1e9, "free_memory_gb": torch.cuda.mem_get_info(dev)[0] / 1e9,
                 "nccl": ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
                 "cudnn": torch.backends.cudnn.version(), "bf16_supported": torch.cuda.is_bf16_supported(),
                 "nvidia_smi": _nvidia_smi()})
    rep.check("bf16_matmul_finite", math.isfinite(float(y)), f"sum of a 1024^2 bf16 matmul: {float(y):.4g}")


def _cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), re.M) if cpuinfo.exists() else []
    return f"{names[0]} ({os.cpu_count()} cores)" if names else platform.machine()


def _nvidia_smi() -> str | None:
    """Name, driver, memory, max SM clock and power limit as nvidia-smi reports them."""
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def stage_fsdp_bf16(rep: Report, p: dict[str, Any], device: str) -> None:
    import torch
    from algorithms.losses import PolicyLoss
    from core import dist
    from core.models import ModelConfig, build_model, shard_model
    from roles.actor import Actor

    info = _init_dist(device)
    rep.figures({"backend": info.backend, "world_size": info.world_size, "device": str(info.device)})
    _check_collectives(rep, info)
    cfg = ModelConfig(config=dict(model_type="qwen2", vocab_size=p["vocab"], hidden_size=p["hidden"],
                                  intermediate_size=2 * p["hidden"], num_hidden_layers=p["layers"],
                                  num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, tie_word_embeddings=False))

    def actor(model, dtype: str) -> Actor:
        return Actor(Actor.Config(lr=p["lr"], micro_batch_size=p["micro_batch"], param_dtype=dtype),
                     model, total_steps=1)
    ref = actor(build_model(cfg, seed=0), "float32")  # plain float32 model on CPU
    bf16 = actor(shard_model(build_model(cfg, seed=0), dist.mesh(), param_dtype=torch.bfloat16)
                 .to(info.device), "bfloat16")
    batch = _random_batch(seed=1, B=p["batch"], P=p["prompt_len"], R=p["response_len"], vocab=p["vocab"])
    noise = torch.randn(batch.response_ids.shape, generator=torch.Generator().manual_seed(2))
    batch = batch.with_fields(old_logp=(ref.log_probs(batch) + 0.05 * noise) * batch.response_mask)
    dev_batch = batch.to(info.device)
    mask = batch.response_mask.bool()
    logp_diff = (bf16.log_probs(dev_batch).float().cpu() - ref.log_probs(batch))[mask].abs()
    rep.figures({"logp_mean_abs_diff": logp_diff.mean(), "logp_max_abs_diff": logp_diff.max()})
    loss_fn = PolicyLoss()
    grads = {}
    for name, a, b in (("fp32_cpu", ref, batch), ("bf16_fsdp", bf16, dev_batch)):
        metrics = a.accumulate(b, loss_fn)
        rep.figure(f"loss_{name}", metrics["loss"])
        grads[name] = {n: _full(q.grad) for n, q in a.model.named_parameters()}
        a.optimizer.zero_grad(set_to_none=True)
    before = _full_params(ref.model)
    same_init = all(torch.equal(before[n], v) for n, v in _full_params(bf16.model).items())
    rep.check("same_initial_weights", same_init, "both models built from seed 0 (float32 masters)")
    ref.update(batch, loss_fn=loss_fn)
    bf16.update(dev_batch, loss_fn=loss_fn)
    _compare_update(rep, grads, before, _full_params(ref.model), _full_params(bf16.model), p["lr"])
    if info.device.type == "cuda":
        rep.figure("peak_allocated_gb", torch.cuda.max_memory_allocated(info.device) / 1e9)


def _check_collectives(rep: Report, info: DistInfo) -> None:
    import torch
    import torch.distributed as tdist
    t = torch.arange(4.0, device=info.device)
    tdist.all_reduce(t)
    out = torch.empty(4 * info.world_size, device=info.device)
    tdist.all_gather_into_tensor(out, torch.arange(4.0, device=info.device))
    expect = torch.arange(4.0, device=info.device)
    ok = torch.equal(t, expect * info.world_size) and torch.equal(out, expect.repeat(info.world_size))
    rep.check("collectives", ok, f"all_reduce and all_gather_into_tensor on {info.backend}")


def _compare_update(rep: Report, grads: dict[str, dict[str, torch.Tensor]], before: dict[str, torch.Tensor],
                    after_ref: dict[str, torch.Tensor], after_bf16: dict[str, torch.Tensor], lr: float) -> None:
    import torch
    loss_diff = abs(rep.data["figures"]["loss_bf16_fsdp"] - rep.data["figures"]["loss_fp32_cpu"])
    g_ref, g_bf = grads["fp32_cpu"], grads["bf16_fsdp"]
    grad_err = math.sqrt(sum(float((g_bf[n] - g).pow(2).sum()) for n, g in g_ref.items()))
    grad_rel = grad_err / math.sqrt(sum(float(g.pow(2).sum()) for g in g_ref.values()))
    d_ref = torch.cat([(after_ref[n] - before[n]).reshape(-1) for n in before])
    d_bf = torch.cat([(after_bf16[n] - before[n]).reshape(-1) for n in before])
    agree = float((d_ref.sign() == d_bf.sign()).float().mean())
    max_diff = float((d_bf - d_ref).abs().max()) / lr
    rep.figures({"loss_abs_diff": loss_diff, "grad_rel_l2_error": grad_rel,
                 "update_sign_agreement": agree, "param_max_abs_diff_in_lr": max_diff,
                 "update_rel_l2_error": float((d_bf - d_ref).norm() / d_ref.norm()),
                 "params_moved": float((d_ref != 0).float().mean())})
    logp = rep.data["figures"]
    rep.check("logp", logp["logp_mean_abs_diff"] <= TOLERANCE["logp_mean_abs"]
              and logp["logp_max_abs_diff"] <= TOLERANCE["logp_max_abs"],
              f"mean {logp['logp_mean_abs_diff']:.2e} <= {TOLERANCE['logp_mean_abs']}, "
              f"max {logp['logp_max_abs_diff']:.2e} <= {TOLERANCE['logp_max_abs']}")
    rep.check("loss", loss_diff <= TOLERANCE["loss_abs"], f"|diff| {loss_diff:.2e} <= {TOLERANCE['loss_abs']}")
    rep.check("gradient", grad_rel <= TOLERANCE["grad_rel_l2"],
              f"relative L2 error {grad_rel:.2e} <= {TOLERANCE['grad_rel_l2']}")
    rep.check("parameters", agree >= TOLERANCE["update_sign_agreement"]
              and max_diff <= TOLERANCE["param_max_abs_in_lr"] and float(d_ref.abs().max()) > 0,
              f"update signs agree on {agree:.4f} >= {TOLERANCE['update_sign_agreement']} of elements; "
              f"max |diff| {max_diff:.3f} lr <= {TOLERANCE['param_max_abs_in_lr']} lr")


def _sharded_actor(p: dict[str, Any], device: torch.device, *, seed: int, micro_batch: int = 8) -> Actor:
    """The FSDP2 actor at the shape p["shape"], bf16 compute, float32 masters, as launch.build
    places it (sharded on CPU, then moved to the device)."""
    import torch
    from core import dist
    from core.models import build_model, shard_model
    from roles.actor import Actor
    model = shard_model(build_model(_model_config(p["shape"], p["vocab"]), seed=seed), dist.mesh(),
                        param_dtype=torch.bfloat16).to(device)
    return Actor(Actor.Config(lr=1e-5, micro_batch_size=micro_batch, param_dtype="bfloat16"),
                 model, total_steps=4)


def _engine(p: dict[str, Any], device: torch.device, options: TorchEngineConfig | None = None, *,
            model: torch.nn.Module | None = None) -> TorchEngine:
    import torch
    from core.models import build_model
    from roles.rollout.torch_engine import TorchEngine
    model = model if model is not None else build_model(_model_config(p["shape"], p["vocab"]), seed=1)
    return TorchEngine(model, pad_token_id=0, device=device, dtype=torch.bfloat16, options=options)


def stage_weight_sync(rep: Report, p: dict[str, Any], device: str) -> None:
    import torch
    from core.hybrid import HybridConfig, HybridEngine
    info = _init_dist(device)
    t0 = time.perf_counter()
    actor, engine = _sharded_actor(p, info.device, seed=0), _engine(p, info.device)
    rep.figure("build_s", time.perf_counter() - t0)
    rep.figure("params", sum(q.numel() for q in actor.model.parameters()))
    hybrid = HybridEngine(HybridConfig(bucket_mb=p["bucket_mb"]), actor=actor, rollout=engine,
                          engine_dtype=torch.bfloat16, device=info.device)
    first = hybrid.sync_weights(force=True)
    rep.figure("first_sync_s", first["reshard/seconds"])
    runs = [hybrid.sync_weights(force=True) for _ in range(p["repeats"])]
    seconds = statistics.median(r["reshard/seconds"] for r in runs)
    rep.figures({"bytes": runs[0]["reshard/bytes"], "buckets": runs[0]["reshard/buckets"],
                 "seconds_median": seconds, "gbps": runs[0]["reshard/bytes"] / seconds / 1e9,
                 "repeats": len(runs)})
    engine_w = dict(engine.named_weights())
    equal = all(torch.equal(engine_w[n], (q.full_tensor() if hasattr(q, "full_tensor") else q)
                            .detach().to(torch.bfloat16)) for n, q in actor.model.named_parameters())
    rep.check("engine_weights_equal_actor", equal and set(engine_w) == {n for n, _ in actor.model.named_parameters()},
              "every engine parameter equals the actor's full parameter cast to bf16, bit for bit")
    expected = 2 * rep.data["figures"]["params"]
    rep.check("bytes", runs[0]["reshard/bytes"] == expected, f"{runs[0]['reshard/bytes']:.0f} == 2 x params")


def _prompts(*, n: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(max(1, length // 2), length + 1, (n,), generator=g)
    mask = (torch.arange(length)[None] >= length - lens[:, None]).long()
    return torch.randint(3, vocab, (n, length), generator=g) * mask, mask


def stage_torch_engine(rep: Report, p: dict[str, Any], device: str) -> None:
    import dataclasses
    import torch
    from core.models import build_model
    from roles.rollout.engine import SamplingParams
    from roles.rollout.torch_engine import TorchEngineConfig
    dev = _torch_device(device)
    model = build_model(_model_config(p["shape"], p["vocab"]), seed=0)
    ids, mask = _prompts(n=p["prompts"], length=p["prompt_len"], vocab=p["vocab"], seed=3)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=p["new_tokens"], stop_token_ids=(1,))
    rep.figures({"prompts": p["prompts"], "new_tokens": p["new_tokens"]})
    variants = {"growing": TorchEngineConfig(static_cache=False),
                "static": TorchEngineConfig(static_cache=True),
                "compiled": TorchEngineConfig(compile=True)}
    tokens = {}
    for name in p["variants"]:
        engine = _engine(p, dev, variants[name], model=model)
        t0 = time.perf_counter()
        if name == "compiled":  # same shapes as the measured call, or it compiles again
            engine.generate(ids, mask, sampling)
        else:
            engine.generate(ids, mask, dataclasses.replace(sampling, max_new_tokens=p["warmup_tokens"]))
        _sync(dev)
        rep.figure(f"{name}/warmup_s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        gen = engine.generate(ids, mask, sampling)
        _sync(dev)
        seconds = time.perf_counter() - t0
        n_tokens = int(gen.response_mask.sum())
        rep.figures({"seconds": seconds, "tokens": n_tokens, "tokens_per_s": n_tokens / seconds}, f"{name}/")
        tokens[name] = gen.response_ids.cpu()
        engine.sleep()
        if name != p["variants"][0]:
            _compare_tokens(rep, p["variants"][0], name, tokens)
    if dev.type == "cuda":
        rep.figure("peak_allocated_gb", torch.cuda.max_memory_allocated(dev) / 1e9)


def _compare_tokens(rep: Report, base: str, name: str, tokens: dict[str, torch.Tensor]) -> None:
    import torch
    a, b = tokens[base], tokens[name]
    width = min(a.shape[1], b.shape[1])
    differ = a[:, :width] != b[:, :width]
    first = [int(row.nonzero()[0]) if row.any() else width for row in differ]
    same_rows = sum(f == width for f in first) / len(first)
    rep.figures({"identical_rows": same_rows, "first_difference_min": min(first),
                 "first_difference_median": statistics.median(first)}, f"{name}_vs_{base}/")
    rep.check(f"{name}_tokens_equal_{base}", bool(torch.equal(a, b)),
              f"{same_rows:.3f} of rows identical; first differing position min {min(first)}, "
              f"median {statistics.median(first)} of {width}")


def stage_offload(rep: Report, p: dict[str, Any], device: str) -> None:
    import torch
    from algorithms.losses import PolicyLoss
    from core.graph import Phase
    from core.hybrid import HybridConfig, HybridEngine
    from core.offload import MemoryHandoff
    from roles.rollout.engine import SamplingParams
    info = _init_dist(device)
    actor = _sharded_actor(p, info.device, seed=0, micro_batch=p["micro_batch"])
    engine = _engine(p, info.device)
    cfg = HybridConfig(offload_optimizer=True, offload_params=p["offload_params"])
    handoff = MemoryHandoff(optimizers=[actor.optimizer], modules=[actor.model], device=info.device,
                            offload_optimizer=cfg.offload_optimizer, offload_params=cfg.offload_params)
    hybrid = HybridEngine(cfg, actor=actor, rollout=engine, engine_dtype=torch.bfloat16,
                          device=info.device, handoff=handoff)
    batch = _random_batch(seed=1, B=p["batch"], P=p["prompt_len"], R=p["response_len"], vocab=p["vocab"])
    batch = batch.to(info.device)
    batch = batch.with_fields(old_logp=actor.log_probs(batch))
    first = actor.update(batch, loss_fn=PolicyLoss()).metrics
    allocated = {"train": _allocated_gb(info.device)}
    rep.figures(hybrid.enter(Phase.GENERATE))
    allocated["generate"] = _allocated_gb(info.device)
    gen = engine.generate(batch.prompt_ids, batch.prompt_mask,
                          SamplingParams(temperature=1.0, max_new_tokens=p["gen_tokens"], seed=0))
    rep.figure("generated_tokens", int(gen.response_mask.sum()))
    rep.figures(hybrid.enter(Phase.TRAIN))
    probe = dict(actor.model.named_parameters())[p["probe_param"]]
    before = _full(probe).clone()
    second = actor.update(batch, loss_fn=PolicyLoss()).metrics
    rep.check("second_update_moves_params", not torch.equal(before, _full(probe)),
              f"{p['probe_param']} changed in the update after the cycle")
    rep.figures({"allocated_train_gb": allocated["train"], "allocated_generate_gb": allocated["generate"],
                 "loss_first": first["actor/pg_loss"], "loss_second": second["actor/pg_loss"]})
    _check_handoff(rep, actor, info.device, handoff.active, allocated)
    rep.check("second_update_finite", all(math.isfinite(v) for v in second.values()),
              "the update after the cycle gives finite metrics")


def _allocated_gb(device: torch.device) -> float:
    import torch
    return torch.cuda.memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0


def _check_handoff(rep: Report, actor: Actor, device: torch.device, active: bool,
                   allocated: dict[str, float]) -> None:
    local = lambda t: t._local_tensor if hasattr(t, "_local_tensor") else t  # noqa: E731
    where = {local(v).device.type for s in actor.optimizer.state.values() for k, v in s.items() if k != "step"}
    where |= {local(q).device.type for q in actor.model.parameters()}
    rep.check("state_back_on_device", where == {device.type}, f"parameters and optimizer state on {sorted(where)}")
    stepped = {id(q) for group in actor.optimizer.param_groups for q in group["params"]}
    rep.check("optimizer_holds_model_params", stepped == {id(q) for q in actor.model.parameters()},
              "after the moves the optimizer still steps the model's own parameter objects")
    if not active:
        rep.figure("note", "the hand-off is a no-op off CUDA: no offload/* or memory/* figures")
        return
    figures = rep.data["figures"]
    moved = sum(v for k, v in figures.items() if k.startswith("offload/offload_") and k.endswith("_gb"))
    freed = allocated["train"] - allocated["generate"]
    rep.check("memory_freed", freed >= 0.9 * moved > 0,
              f"allocated fell by {freed:.2f} GB while generating; {moved:.2f} GB offloaded")


def _torchrun(module: str, overrides: list[str], work: Path, device: str) -> None:
    """`torchrun --standalone --nproc_per_node=1 -m module --config configs/quickstart.yaml ...`;
    raises with the child's last error line and log tail when it fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", module, "--config", "configs/quickstart.yaml", f"run.device={device}",
           f"run.output_dir={work / 'run'}", *overrides]
    log = work / "torchrun.log"
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.run(cmd, cwd=ROOT, env=_child_env(), stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        lines = log.read_text(errors="replace").splitlines()
        errors = [ln.strip() for ln in lines if re.search(r"^\s*[\w.]*(Error|Exception)\b.*:", ln)
                  and "ChildFailedError" not in ln]  # torchrun's own summary, not the cause
        tail = "\n".join(lines[-LOG_TAIL_LINES:])
        raise RuntimeError(f"{module} exited with {rc}: {errors[-1] if errors else '(no Python error line)'}"
                           f"\n--- last lines of {log.name} ---\n{tail}")


def stage_bench(rep: Report, p: dict[str, Any], device: str) -> None:
    work = Path(p["_work"])
    _torchrun("launch.bench", [f"bench.shape={p['shape']}", f"bench.warmup={p['warmup']}",
                               f"bench.steps={p['steps']}", f"data.prompts_per_step={p['prompts']}",
                               f"rollout.n={p['n']}", f"rollout.max_new_tokens={p['new_tokens']}",
                               f"actor.micro_batch_size={p['micro_batch']}", "actor.param_dtype=bfloat16",
                               "rollout.dtype=bfloat16", "tracking.enabled=false"], work, device)
    summary = json.loads((work / "run" / "bench.json").read_text())
    rep.figures(summary)
    key = ("step_s", "generate_tokens_per_s", "train_tokens_per_s", "reshard/gbps")
    bad = [k for k in key if not isinstance(summary.get(k), (int, float)) or not math.isfinite(summary[k])]
    rep.check("figures_finite", not bad, f"{', '.join(key)} finite" + (f"; not: {bad}" if bad else ""))


def stage_train(rep: Report, p: dict[str, Any], device: str) -> None:
    work = Path(p["_work"])
    _torchrun("launch.train", [f"run.steps={p['steps']}", f"eval.every={p['eval_every']}",
                               "tracking.enabled=false", *p["overrides"]], work, device)
    rows = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    acc = [(r["step"], r["eval/accuracy"]) for r in rows if "eval/accuracy" in r]
    steps = [r for r in rows if r["step"] > 0]
    rep.figures({"steps": len(steps), "eval_steps": [s for s, _ in acc],
                 "eval_accuracy": [a for _, a in acc],
                 "eval_accuracy_first": acc[0][1], "eval_accuracy_last": acc[-1][1],
                 "reward_first": steps[0]["reward/mean"], "reward_last": steps[-1]["reward/mean"],
                 "step_s_median": statistics.median(r["timing_s/step"] for r in steps),
                 "reshard_gbps_median": statistics.median(r.get("reshard/gbps", 0.0) for r in steps)})
    bad = sorted({k for r in rows for k, v in r.items()
                  if isinstance(v, float) and not math.isfinite(v)})
    rep.check("metrics_finite", not bad, "every metric of every step finite" + (f"; not: {bad}" if bad else ""))
    rep.check("steps_done", len(steps) == p["steps"], f"{len(steps)} of {p['steps']} steps in metrics.jsonl")
    rep.check("accuracy_rises", acc[-1][1] > acc[0][1],
              f"eval/accuracy {acc[0][1]:.3f} (step {acc[0][0]}) -> {acc[-1][1]:.3f} (step {acc[-1][0]})")
    for bulky in ("checkpoints", "hf"):  # megabytes the report does not need (the $OUT limit)
        shutil.rmtree(work / "run" / bulky, ignore_errors=True)


# --- the stage table ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Stage:
    name: str
    run: Callable[[Report, dict[str, Any], str], None]
    cuda: dict[str, Any]
    """Sizes and timeout on one H100/H200."""
    cpu: dict[str, Any]
    """Tiny sizes for --device cpu (seconds)."""
    headline: tuple[str, ...]
    """Figures shown in the summary table of gpu_check.md."""


_PROBE = "model.layers.0.self_attn.q_proj.weight"
_TINY_FSDP = dict(vocab=256, hidden=64, layers=2, batch=16, prompt_len=12, response_len=20,
                  micro_batch=8, lr=1e-3)
STAGES = [
    Stage("environment", stage_environment, dict(timeout_s=60), dict(timeout_s=60),
          ("device_name", "memory_gb", "torch", "cuda", "nccl", "transformers", "python")),
    Stage("fsdp_bf16", stage_fsdp_bf16, dict(timeout_s=60, **_TINY_FSDP), dict(timeout_s=90, **_TINY_FSDP),
          ("backend", "logp_max_abs_diff", "loss_abs_diff", "grad_rel_l2_error", "update_sign_agreement")),
    Stage("weight_sync", stage_weight_sync,
          dict(timeout_s=75, shape="qwen2.5-0.5b", vocab=151936, bucket_mb=64, repeats=3),
          dict(timeout_s=60, shape="tiny", vocab=512, bucket_mb=1, repeats=3),
          ("bytes", "seconds_median", "gbps", "buckets")),
    Stage("torch_engine", stage_torch_engine,
          dict(timeout_s=180, shape="qwen2.5-0.5b", vocab=151936, prompts=64, prompt_len=64,
               new_tokens=512, warmup_tokens=8, variants=["growing", "static", "compiled"]),
          # compiled decode on CPU (inductor, ~40 s here) is tests/test_engine.py's slow test
          dict(timeout_s=180, shape="tiny", vocab=512, prompts=8, prompt_len=16, new_tokens=16,
               warmup_tokens=4, variants=["growing", "static"]),
          ("growing/tokens_per_s", "static/tokens_per_s", "compiled/tokens_per_s", "compiled/warmup_s",
           "static_vs_growing/identical_rows", "compiled_vs_growing/identical_rows")),
    Stage("offload", stage_offload,
          dict(timeout_s=75, shape="qwen2.5-0.5b", vocab=151936, batch=16, prompt_len=64, response_len=128,
               micro_batch=8, gen_tokens=32, offload_params=True, probe_param=_PROBE),
          dict(timeout_s=60, shape="tiny", vocab=512, batch=8, prompt_len=8, response_len=8,
               micro_batch=8, gen_tokens=4, offload_params=True, probe_param=_PROBE),
          ("offload/offload_optimizer_gbps", "offload/reload_optimizer_gbps", "memory/train_peak_allocated_gb",
           "memory/generate_peak_allocated_gb", "reshard/gbps")),
    Stage("bench", stage_bench,
          dict(timeout_s=150, shape="qwen2.5-0.5b", warmup=1, steps=2, prompts=64, n=8, new_tokens=256,
               micro_batch=32),
          dict(timeout_s=120, shape="tiny", warmup=1, steps=1, prompts=8, n=2, new_tokens=8, micro_batch=8),
          ("step_s", "generate_tokens_per_s", "train_tokens_per_s", "mfu", "reshard/gbps")),
    Stage("train", stage_train,
          dict(timeout_s=120, steps=20, eval_every=10, overrides=[]),
          dict(timeout_s=150, steps=6, eval_every=3,
               overrides=["data.task.eval_size=200", "data.task.train_size=5000"]),
          ("eval_accuracy_first", "eval_accuracy_last", "step_s_median", "reshard_gbps_median")),
]
BY_NAME = {s.name: s for s in STAGES}
assert all(set(s.cuda) == set(s.cpu) and "timeout_s" in s.cuda for s in STAGES)


def worker(name: str, device: str, work: Path, params: dict[str, Any]) -> int:
    """Run one stage in this process; its figures go to work/result.json as they come."""
    import logging
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format=f"[{name} %(asctime)s %(levelname).1s %(name)s] %(message)s", datefmt="%H:%M:%S")
    rep = Report(work / "result.json")
    try:
        BY_NAME[name].run(rep, {**params, "_work": str(work)}, device)
    except BaseException as e:  # recorded, then reported through the exit code
        rep.error(e)
        traceback.print_exc()
        return 1
    finally:
        _destroy_dist()
    return 0


def _destroy_dist() -> None:
    if "core.dist" in sys.modules:
        sys.modules["core.dist"].destroy()


# --- the orchestrator ---------------------------------------------------------------------------

def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_stage(stage: Stage, params: dict[str, Any], device: str, out: Path, timeout: float) -> dict[str, Any]:
    """One stage in a fresh process group, killed at `timeout`; its record for gpu_check.json."""
    work = out / "stages" / stage.name
    shutil.rmtree(work, ignore_errors=True)  # a rerun must not resume an old run's checkpoints
    work.mkdir(parents=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", stage.name, "--device", device,
           "--work", str(work), "--params", json.dumps(params)]
    t0 = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_child_env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            timed_out, stopped = _wait(proc, timeout), False
        except KeyboardInterrupt:  # the check itself is stopped (Ctrl-C, SIGTERM): the stage too
            _kill_group(proc)
            timed_out, stopped = False, True
    record = {"name": stage.name, "seconds": time.perf_counter() - t0, "timeout_s": timeout,
              "params": params, "pid": proc.pid, "exit_code": proc.returncode}
    result_path = work / "result.json"
    result = json.loads(result_path.read_text()) if result_path.exists() else {"figures": {}, "checks": {}}
    record.update(result)
    record["status"] = "interrupted" if stopped else _status(timed_out, proc.returncode, result)
    if record["status"] != "passed":
        lines = (work / "log.txt").read_text(errors="replace").splitlines()
        record["log_tail"] = "\n".join(lines[-LOG_TAIL_LINES:])
    if timed_out:
        record["error"] = f"timed out after {timeout:.0f} s (process group killed)"
    return record


def _wait(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait for proc; at the timeout kill its whole process group (torchrun and its workers
    too). Returns whether it timed out."""
    try:
        proc.wait(timeout=timeout)
        return False
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group, SIGKILL after 5 s; waits at most 15 s in all."""
    for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _status(timed_out: bool, code: int | None, result: dict[str, Any]) -> str:
    if timed_out:
        return "timeout"
    if "error" in result:
        return "error"
    if code != 0:
        return "crashed"
    return "passed" if all(c["passed"] for c in result["checks"].values()) else "failed"


def parse_sets(items: list[str]) -> dict[str, dict[str, Any]]:
    """`stage.key=value` (value as JSON, else a string) into {stage: {key: value}}; unknown
    stages or keys are errors that list the valid ones."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        name, dot, field = key.partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {item!r}: expected stage.key=value")
        if name not in BY_NAME:
            raise ValueError(f"--set {item!r}: unknown stage {name!r}; stages: {', '.join(BY_NAME)}")
        if field not in BY_NAME[name].cuda:
            raise ValueError(f"--set {item!r}: stage {name} has no {field!r}; keys: {', '.join(BY_NAME[name].cuda)}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.setdefault(name, {})[field] = value
    return out


def write_reports(out: Path, run: dict[str, Any]) -> None:
    """gpu_check.json and gpu_check.md, each replaced atomically."""
    for name, text in (("gpu_check.json", json.dumps(run, indent=1) + "\n"), ("gpu_check.md", markdown(run))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def markdown(run: dict[str, Any]) -> str:
    env = next((s for s in run["stages"] if s["name"] == "environment"), {}).get("figures", {})
    lines = [f"# GPU check, {run['started'][:10]}: {env.get('device_name', run['device'])}", "",
             f"`{run['command']}`", "",
             f"git {run['git']}; device `{run['device']}`; {run['seconds']:.0f} s of a {run['budget_s']:.0f} s budget"
             + ("" if run["finished"] else " (still running or killed)"), "",
             "| stage | status | seconds | figures |", "|---|---|---|---|"]
    for s in run["stages"]:
        figs = s.get("figures", {})
        shown = "; ".join(f"{k} {_fmt(figs[k])}" for k in BY_NAME[s["name"]].headline if k in figs)
        lines.append(f"| {s['name']} | {s['status']} | {s.get('seconds', 0):.1f} | {shown} |")
    for s in run["stages"]:
        lines += ["", f"## {s['name']}: {s['status']}", ""]
        lines += [f"- check `{k}`: {'ok' if c['passed'] else 'FAILED'} ({c['detail']})" for k, c in s.get("checks", {}).items()]
        lines += [f"- {k}: {_fmt(v)}" for k, v in s.get("figures", {}).items()]
        if s.get("error"):
            lines += ["", "Error: `" + s["error"].splitlines()[0] + "`"]
        for key in ("traceback", "log_tail"):
            if s.get(key):
                lines += ["", f"{key}:", "", "```", s[key].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def _git() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def check(out: Path, device: str, names: list[str], sets: dict[str, dict[str, Any]], budget: float) -> dict[str, Any]:
    """Every named stage in order, the reports rewritten after each; returns the run record.
    Raises KeyboardInterrupt, after writing the reports, when the check is stopped."""
    out = out.resolve()  # stages run in the repository root
    out.mkdir(parents=True, exist_ok=True)
    run: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "device": device,
                           "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                           "finished": None, "seconds": 0.0, "budget_s": budget, "git": _git(),
                           "tolerance": TOLERANCE,
                           "stages": [{"name": n, "status": "pending"} for n in names]}
    write_reports(out, run)
    t0 = time.perf_counter()
    for i, name in enumerate(names):
        stage = BY_NAME[name]
        params = {**(stage.cuda if device == "cuda" else stage.cpu), **sets.get(name, {})}
        left = budget - (time.perf_counter() - t0)
        if left < 10:
            run["stages"][i] = _bare(name, "skipped", params, f"time budget of {budget:.0f} s spent")
        else:
            print(f"[gpu_check] {name}: starting (timeout {min(params['timeout_s'], left):.0f} s)", flush=True)
            try:
                run["stages"][i] = run_stage(stage, params, device, out, min(float(params["timeout_s"]), left))
            except KeyboardInterrupt:  # stopped before or after the stage's own wait
                run["stages"][i] = _bare(name, "interrupted", params, "the check was stopped")
        rec = run["stages"][i]
        print(f"[gpu_check] {name}: {rec['status']} in {rec.get('seconds', 0):.1f} s"
              + (f": {rec['error'].splitlines()[0]}" if rec.get("error") else ""), flush=True)
        run["seconds"] = time.perf_counter() - t0
        write_reports(out, run)
        if rec["status"] == "interrupted":
            raise KeyboardInterrupt
    run["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_reports(out, run)
    return run


def _bare(name: str, status: str, params: dict[str, Any], error: str) -> dict[str, Any]:
    """The record of a stage that did not run (or was stopped before its process started)."""
    return {"name": name, "status": status, "params": params, "figures": {}, "checks": {}, "error": error}


def _stop(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="folder for gpu_check.json, gpu_check.md and stages/")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--stages", default=",".join(BY_NAME), help=f"comma-separated, run in this order (default: {','.join(BY_NAME)})")
    ap.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                    help="override a stage's size or timeout_s, e.g. torch_engine.new_tokens=256")
    ap.add_argument("--budget-s", type=float, default=None, help="whole-run time budget (default: 450 on cuda, 600 on cpu)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.device, args.work, json.loads(args.params))
    if args.out is None:
        ap.error("--out is required")
    names = [n.strip() for n in args.stages.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        ap.error(f"unknown stages {unknown}; stages: {', '.join(BY_NAME)}")
    try:
        sets = parse_sets(args.set)
    except ValueError as e:
        ap.error(str(e))
    signal.signal(signal.SIGTERM, _stop)
    try:
        run = check(args.out, args.device, names, sets, args.budget_s or DEFAULT_BUDGET_S[args.device])
    except KeyboardInterrupt:
        print(f"[gpu_check] stopped; partial reports in {args.out}", flush=True)
        return 130
    counts = {st: sum(s["status"] == st for s in run["stages"]) for st in {s["status"] for s in run["stages"]}}
    print(f"[gpu_check] {run['seconds']:.0f} s; " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
          + f"; {args.out / 'gpu_check.md'}", flush=True)
    return 0 if counts.get("passed", 0) == len(names) else 1


if __name__ == "__main__":
    sys.exit(main())
