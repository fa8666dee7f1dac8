"""The `sglang` rollout engine: an in-process `sglang.Engine` behind the `torch` engine's interface.

Written against sglang 0.5.21 (the newest release of the `rolegraph[sglang]` range in setup.cfg).
Every call below was checked against that release's source: tools/sglang_api.py records the
signatures from the wheel into tests/data/sglang_api_0.5.21.json, and tests/test_sglang_engine.py
drives this adapter against a stand-in that accepts exactly those parameters. SGLang's kernels
are CUDA-only, so this engine has NOT run on real hardware in this repository (docs/gpu.md).

Layout: `rollout.engine.tp_size` = T ranks form one tensor-parallel group; the group's first
rank (the leader) owns the `sglang.Engine` (which starts T schedulers on GPUs
base_gpu_id .. base_gpu_id+T-1, the GPUs of the group's ranks); data-parallel replicas =
world size / T. In a group, prompts are gathered to the leader, generated together, and the
results scattered back.

Weights: full tensors (core/reshard.py; SGLang slices them itself for its TP workers) go to
`update_weights_from_tensor` bucket by bucket, one flattened bucket per call
(load_format="flattened_bucket"), one payload per TP rank serialized by that rank from its own
GPU, inside a begin/end_weight_update session, the cache flushed once after the last bucket.
Every result is checked: SGLang reports failures as (False, message), not as exceptions.
Memory: `release_memory_occupation` (weights, KV cache, CUDA graphs) when training takes the
GPU; `resume_memory_occupation(["weights"])` before a sync and `["kv_cache", "cuda_graph"]`
after it. Released weights have no CPU backup, so every wake is
preceded by a full sync (`needs_full_sync`), even when the actor did not step.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterable, Sequence

import torch
import torch.distributed as tdist

from core.config import above, at_least, between
from core.offload import disable_expandable_segments
from roles.rollout.engine import Completion, Engine, EngineConfig, EngineContext, PauseRule, Request, register_engine

logger = logging.getLogger(__name__)

TAGS_BEFORE_SYNC = ["weights"]
TAGS_AFTER_SYNC = ["kv_cache", "cuda_graph"]
ALL_TAGS = ["weights", "kv_cache", "cuda_graph"]
INSTALL = ("the sglang engine needs SGLang and a CUDA GPU: pip install 'rolegraph[sglang]' "
           "(sglang 0.5.18-0.5.21, which pin torch 2.13.0) on a CUDA machine; on CPU use "
           "rollout.engine=torch")


@register_engine("sglang")
@dataclass(kw_only=True, slots=True)
class SGLangConfig(EngineConfig):
    name: str = "sglang"
    tp_size: int = 1
    """Ranks per tensor-parallel engine; data-parallel replicas = world size / tp_size."""
    mem_fraction_static: float = 0.5
    """Share of GPU memory SGLang reserves for weights + KV cache (the rest is training's)."""
    cuda_graph: bool = True
    memory_saver: bool = True
    """enable_memory_saver: lets release/resume_memory_occupation free and restore memory."""
    flattened_bucket: bool = True
    """One flattened tensor per weight bucket (fewer IPC handles), where the release supports it."""
    server_args: dict[str, Any] = field(default_factory=dict)
    """Extra sglang.Engine (ServerArgs) keyword arguments, e.g. {attention_backend: fa3};
    {enable_deterministic_inference: true} makes the per-sample seeds take effect (slower)."""
    group_timeout_hours: float = 6.0
    """Timeout of the TP group's gloo collectives (ranks wait in them while the leader generates)."""

    def __post_init__(self) -> None:
        at_least(self, 1, "tp_size")
        above(self, 0, "group_timeout_hours")
        between(self, 0, 1, "mem_fraction_static")
        above(self, 0, "mem_fraction_static")

    def build(self, ctx: EngineContext) -> SGLangEngine:
        return SGLangEngine(None, pad_token_id=ctx.pad_token_id, device=ctx.device, dtype=ctx.dtype,
                            model_path=ctx.model_path, options=self, seed=ctx.seed,
                            stop_token_ids=ctx.stop_token_ids)

    def prepare_process(self) -> None:
        # SGLang's memory saver cannot work with expandable segments; before CUDA starts.
        disable_expandable_segments("incompatible with SGLang's memory saver")


def import_sglang():
    """sglang, or an ImportError that says what to install."""
    try:
        import sglang
    except ImportError as e:
        raise ImportError(INSTALL) from e
    return sglang


def check_runtime(device: torch.device) -> None:
    """Fail at start-up, saying what to install, where SGLang cannot run."""
    if device.type != "cuda":
        raise RuntimeError(f"rollout.engine=sglang on device {device.type!r}: {INSTALL}")
    import_sglang()


def engine_kwargs(cfg: SGLangConfig, *, model_path: str, dtype: torch.dtype, base_gpu_id: int,
                  seed: int) -> dict[str, Any]:
    """The sglang.Engine (ServerArgs) arguments of one engine."""
    names = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
    return {"model_path": model_path, "dtype": names[dtype], "tp_size": cfg.tp_size,
            "base_gpu_id": base_gpu_id, "mem_fraction_static": cfg.mem_fraction_static,
            "enable_memory_saver": cfg.memory_saver, "disable_cuda_graph": not cfg.cuda_graph,
            "random_seed": seed, "skip_tokenizer_init": True, "log_level": "error",
            **cfg.server_args}


def sampling_dict(request: Request, stop_token_ids: Sequence[int]) -> dict[str, Any]:
    """The SGLang sampling-params dict of one request (its budget minus its prefix, its seed)."""
    sp = request.sampling
    return {
        "temperature": sp.temperature,   # 0: SGLang decodes greedily
        "top_p": sp.top_p,
        "top_k": sp.top_k if sp.top_k > 0 else -1,
        "max_new_tokens": sp.max_new_tokens - len(request.prefix),
        "stop_token_ids": list(stop_token_ids),
        "skip_special_tokens": False,
        "no_stop_trim": True,                  # keep the stop token: it is trained on
        # effective only with server_args {enable_deterministic_inference: true}
        "sampling_seed": sp.seed % (2**31),
    }


def check(result: Any, what: str) -> None:
    """SGLang 0.5.21 reports a failed weight update, session or flush as (False, message) or
    `.success == False` instead of raising; going on would generate from stale weights."""
    if isinstance(result, tuple) and len(result) >= 2 and isinstance(result[0], bool):
        ok, message = result[0], result[1]
    elif hasattr(result, "success"):
        ok, message = bool(result.success), getattr(result, "message", "")
    else:
        return
    if not ok:
        raise RuntimeError(f"SGLang {what} failed: {message}")


def to_completions(outputs: list[dict[str, Any]]) -> list[Completion]:
    """SGLang's per-request dicts (output_ids, meta_info.output_token_logprobs as
    (logprob, token id, text) triples, meta_info.finish_reason.type) as Completions."""
    out = []
    for o in outputs:
        toks = o["output_ids"]
        lps = [lp for lp, _tid, _text in o["meta_info"]["output_token_logprobs"]]
        if len(lps) != len(toks):
            raise ValueError(f"SGLang returned {len(toks)} tokens but {len(lps)} log-probs")
        reason = (o["meta_info"].get("finish_reason") or {}).get("type", "length")
        if reason == "abort":
            raise RuntimeError(f"SGLang aborted a request: {o['meta_info']['finish_reason']}")
        out.append(Completion(tuple(toks), tuple(float(x) for x in lps), "stop" if reason == "stop" else "length"))
    return out


class SGLangEngine(Engine):
    def __init__(self, model: Any, *, pad_token_id: int, device: torch.device,
                 dtype: torch.dtype = torch.bfloat16, model_path: str | None = None,
                 options: SGLangConfig | None = None, seed: int = 0,
                 stop_token_ids: Sequence[int] = ()) -> None:
        cfg = options or SGLangConfig()
        check_runtime(device)
        if not model_path:
            raise ValueError("rollout.engine=sglang needs model.path (a local Hugging Face folder "
                             "SGLang starts from; the actor's weights replace them at every sync)")
        self.sglang = import_sglang()
        self.cfg = cfg
        self.pad_token_id = pad_token_id
        self.device = device
        self.stop_token_ids = tuple(stop_token_ids)
        rank, world = (tdist.get_rank(), tdist.get_world_size()) if tdist.is_initialized() else (0, 1)
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if world % cfg.tp_size or local_world % cfg.tp_size:
            raise ValueError(f"rollout.engine.tp_size={cfg.tp_size} must divide the processes per "
                             f"node ({local_world}): a TP group's ranks and SGLang's GPUs "
                             f"base_gpu_id..+tp_size-1 must be the same GPUs of one node")
        self.tp_rank = rank % cfg.tp_size
        self.group, self.leader_rank = None, rank - self.tp_rank
        if cfg.tp_size > 1:
            # Object collectives on gloo with a long timeout: the group's other ranks wait in
            # them while the leader generates (NCCL's watchdog would abort long rollouts).
            for first in range(0, world, cfg.tp_size):  # every rank creates every group, in order
                g = tdist.new_group(list(range(first, first + cfg.tp_size)), backend="gloo",
                                    timeout=timedelta(hours=cfg.group_timeout_hours))
                if first == self.leader_rank:
                    self.group = g
        self.engine = None
        self.released: set[str] = set()
        """Memory tags released by sleep() and not yet resumed."""
        if self.tp_rank == 0:
            self.engine = self.sglang.Engine(**engine_kwargs(
                cfg, model_path=model_path, dtype=dtype, base_gpu_id=device.index or 0, seed=seed))
        self._bucket_cls = self._serializer = None
        if cfg.flattened_bucket or cfg.tp_size > 1:
            try:
                from sglang.srt.utils import MultiprocessingSerializer
                from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
                from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
            except ImportError as e:
                if cfg.tp_size > 1:
                    raise ImportError(f"rollout.engine.tp_size > 1 needs sglang's FlattenedTensorBucket "
                                      f"(sglang >= 0.5.18): {e}") from e
                logger.warning("this sglang has no FlattenedTensorBucket; sending tensors one by one")
            else:
                # CUDA IPC handles by GPU UUID, as SGLang's workers expect. Process-wide: after
                # it, CPU tensors cannot be sent to worker processes through torch.multiprocessing
                # (nothing in rolegraph does; reward workers receive strings).
                monkey_patch_torch_reductions()
                self._bucket_cls, self._serializer = FlattenedTensorBucket, MultiprocessingSerializer

    # --- weights -------------------------------------------------------------------------------

    def named_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        raise NotImplementedError("SGLang's weights live in its own processes; compare through generate()")

    @property
    def needs_full_sync(self) -> bool:
        """Released weights are not backed up: they must be re-sent even if the actor did not
        step (core/hybrid.py forces the sync). Same value on every rank."""
        return "weights" in self.released

    def _resume(self, tags: list[str]) -> None:
        """Bring back whichever of `tags` are released (each at most once)."""
        tags = [t for t in tags if t in self.released]
        if self.engine is not None and tags:
            self.engine.resume_memory_occupation(tags=tags)
        self.released -= set(tags)

    def begin_weight_update(self) -> None:
        self._resume(TAGS_BEFORE_SYNC)
        if self.engine is not None and hasattr(self.engine, "begin_weight_update"):
            check(self.engine.begin_weight_update(), "begin_weight_update")  # 0.5.21: a session

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """One bucket of full tensors into the engine (a collective over the TP group).

        Every rank of the group serializes its own GPU-local copy (it has the full tensors after
        the FSDP all-gather) as one flattened bucket; the leader hands SGLang one payload per
        TP rank, so each SGLang worker maps the copy on its own GPU and CUDA-IPC reference
        counts stay one per payload. The group waits for the leader before freeing its copies.
        """
        named = [(n, t.to(self.device, non_blocking=True)) for n, t in named_tensors]
        received = sum(t.numel() * t.element_size() for _, t in named)
        if not named:
            return received
        if self._bucket_cls is None:  # tp_size == 1 only, so this rank leads
            assert self.engine is not None
            check(self.engine.update_weights_from_tensor(named_tensors=named, flush_cache=False),
                  "update_weights_from_tensor")
            return received
        assert self._serializer is not None  # imported together with the bucket class
        bucket = self._bucket_cls(named_tensors=named)
        payload = self._serializer.serialize({"flattened_tensor": bucket.get_flattened_tensor(),
                                              "metadata": bucket.get_metadata()}, output_str=True)
        payloads = self._gather(payload)
        try:
            if self.engine is not None:
                check(self.engine.update_weights_from_tensor(named_tensors=payloads,
                                                             load_format="flattened_bucket",
                                                             flush_cache=False),
                      "update_weights_from_tensor")
        finally:
            if self.group is not None:  # keep `bucket` alive until the leader's call returned
                tdist.barrier(group=self.group)
        del bucket
        return received

    def end_weight_update(self, version: int = 0) -> None:
        if self.engine is not None:
            if hasattr(self.engine, "end_weight_update"):
                check(self.engine.end_weight_update(), "end_weight_update")
            check(self.engine.flush_cache(), "flush_cache")
        # The KV cache and CUDA graphs come back in wake(), after the trainer has offloaded
        # what it offloads (core/hybrid.py), not here.

    # --- memory --------------------------------------------------------------------------------

    def sleep(self) -> None:
        tags = [t for t in ALL_TAGS if t not in self.released]
        if self.engine is not None and tags:
            self.engine.release_memory_occupation(tags=tags)
        self.released |= set(tags)

    def wake(self) -> None:
        """Whatever is still released: the KV cache and CUDA graphs after a sync (which brought
        the weights back first)."""
        self._resume(ALL_TAGS)

    # --- generation ----------------------------------------------------------------------------

    @torch.no_grad()
    def generate_requests(self, requests: Sequence[Request], *, pause: PauseRule | None = None
                          ) -> list[Completion]:
        """Token in, token out: input_ids = prompt + prefix; only the new tokens come back. The TP
        group's requests go to its leader's engine in rank order and the results come back."""
        if pause is not None:
            raise NotImplementedError("partial rollouts (pause) are not implemented on the sglang "
                                      "engine yet; set algorithm.off_policy.partial_rollouts=false "
                                      "(off-policy steps without pausing) or use the torch engine")
        groups = self._gather([(list(r.prompt + r.prefix), sampling_dict(r, self.stop_token_ids))
                               for r in requests])
        outputs: list[list[dict]] | None = None
        if self.engine is not None:
            flat = [job for g in groups for job in g]
            result = self.engine.generate(
                input_ids=[ids for ids, _ in flat], sampling_params=[sp for _, sp in flat],
                return_logprob=True) if flat else []
            outputs, start = [], 0
            for g in groups:
                outputs.append(result[start:start + len(g)])
                start += len(g)
        return to_completions(self._scatter(outputs))

    def _gather(self, obj: Any) -> list[Any]:
        """Every group rank's obj on the leader (in TP rank order); [] elsewhere."""
        if self.group is None:
            return [obj]
        out = [None] * self.cfg.tp_size if self.tp_rank == 0 else None
        tdist.gather_object(obj, out, dst=self.leader_rank, group=self.group)
        return out if out is not None else []

    def _scatter(self, outputs: list[list[dict]] | None) -> list[dict]:
        if self.group is None:
            assert outputs is not None  # no group: this rank leads
            return outputs[0]
        got: list[Any] = [None]
        tdist.scatter_object_list(got, outputs, src=self.leader_rank, group=self.group)
        return got[0]

    def shutdown(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
