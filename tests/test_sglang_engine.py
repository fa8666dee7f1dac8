"""The sglang adapter against a stand-in for sglang 0.5.21.

SGLang cannot run on CPU. The stand-in is built from tests/data/sglang_api_0.5.21.json, which
tools/sglang_api.py extracts from the release wheel: every Engine method the adapter calls
accepts exactly that release's parameters (binding a parameter it lacks fails), engine
arguments must be ServerArgs fields, sampling keys SamplingParams fields, memory tags the
release's tags. What this cannot check (CUDA IPC, the real scheduler) is listed in docs/gpu.md.
"""
from __future__ import annotations

import base64
import inspect
import json
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch

from roles.rollout.engine import SamplingParams
from tests.dist_utils import run_distributed

API = json.loads((Path(__file__).parent / "data" / "sglang_api_0.5.21.json").read_text())
STOP = 2


def signature(spec: dict) -> inspect.Signature:
    P = inspect.Parameter
    params = [P(n, P.POSITIONAL_OR_KEYWORD, default=None) for n in spec["positional"]]
    params += [P(n, P.KEYWORD_ONLY, default=None) for n in spec["keyword_only"]]
    if spec["var_keyword"]:
        params.append(P("kwargs", P.VAR_KEYWORD))
    return inspect.Signature(params)


def checked(cls_name: str, method: str):
    """A decorator: the call must bind to the release's signature of cls_name.method."""
    sig = signature(API[cls_name][method])

    def wrap(fn):
        def call(self, *args, **kwargs):
            bound = sig.bind(*args, **kwargs)  # TypeError on a parameter the release lacks
            bound.apply_defaults()
            self.calls.append((method, dict(bound.arguments)))
            return fn(self, **bound.arguments)
        return call
    return wrap


class FakeEngine:
    instances: list = []

    @checked("Engine", "__init__")
    def __init__(self, kwargs):
        unknown = set(kwargs) - set(API["server_args"])
        assert not unknown, f"not sglang 0.5.21 ServerArgs fields: {unknown}"
        self.kwargs = kwargs
        self.weights: dict[str, torch.Tensor] = {}
        FakeEngine.instances.append(self)

    calls: list = []  # replaced per instance below

    def __new__(cls, *a, **k):
        obj = super().__new__(cls)
        obj.calls = []
        return obj

    @checked("Engine", "generate")
    def generate(self, input_ids, sampling_params, return_logprob, **_):
        assert return_logprob is True and len(input_ids) == len(sampling_params)
        out = []
        for ids, sp in zip(input_ids, sampling_params):
            assert set(sp) <= set(API["sampling_params"]), set(sp) - set(API["sampling_params"])
            # a deterministic "model": answers with the prompt's last tokens, then the stop token
            toks = (ids[-3:] + [STOP])[: sp["max_new_tokens"]]
            stopped = toks[-1] == STOP
            out.append({"output_ids": toks, "meta_info": {
                "output_token_logprobs": [(-0.25 * (i + 1), t, None) for i, t in enumerate(toks)],
                "finish_reason": {"type": "stop", "matched": STOP} if stopped else
                {"type": "length", "length": len(toks)}}})
        return out

    fail_update = False

    @checked("Engine", "update_weights_from_tensor")
    def update_weights_from_tensor(self, named_tensors, load_format, flush_cache):
        assert flush_cache is False  # flushed once per sync, not per bucket
        if self.fail_update:  # 0.5.21 reports failures, it does not raise
            return False, "must run between begin_weight_update() and end_weight_update()"
        if load_format == "flattened_bucket":
            self.per_tp_rank = []
            for payload in named_tensors:  # one per TP rank, each serialized by that rank
                data = pickle.loads(base64.b64decode(payload))
                bucket = FakeBucket(flattened_tensor=data["flattened_tensor"], metadata=data["metadata"])
                self.per_tp_rank.append(dict(bucket.reconstruct_tensors()))
            self.weights.update(self.per_tp_rank[0])
        else:
            assert load_format is None
            self.weights.update({n: t.clone() for n, t in named_tensors})
        return True, "Success"

    @checked("Engine", "flush_cache")
    def flush_cache(self):
        return types.SimpleNamespace(success=True)

    @checked("Engine", "release_memory_occupation")
    def release_memory_occupation(self, tags):
        assert set(tags) <= set(API["memory_tags"])

    @checked("Engine", "resume_memory_occupation")
    def resume_memory_occupation(self, tags):
        assert set(tags) <= set(API["memory_tags"])

    @checked("Engine", "begin_weight_update")
    def begin_weight_update(self, selector=None):
        return True, ""

    @checked("Engine", "end_weight_update")
    def end_weight_update(self):
        return True, ""

    @checked("Engine", "shutdown")
    def shutdown(self):
        pass


class FakeBucket:
    """Flattens like sglang's FlattenedTensorBucket (uint8 views + metadata)."""
    calls: list = []

    @checked("FlattenedTensorBucket", "__init__")
    def __init__(self, named_tensors=None, flattened_tensor=None, metadata=None):
        if named_tensors is not None:
            flat, self.metadata, start = [], [], 0
            for name, t in named_tensors:
                b = t.contiguous().flatten().view(torch.uint8)
                self.metadata.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype,
                                                           start_idx=start, end_idx=start + b.numel(),
                                                           numel=t.numel()))
                flat.append(b)
                start += b.numel()
            self.flattened_tensor = torch.cat(flat)
        else:
            self.flattened_tensor, self.metadata = flattened_tensor, metadata

    @checked("FlattenedTensorBucket", "get_flattened_tensor")
    def get_flattened_tensor(self):
        return self.flattened_tensor

    @checked("FlattenedTensorBucket", "get_metadata")
    def get_metadata(self):
        return self.metadata

    def reconstruct_tensors(self):
        return [(m.name, self.flattened_tensor[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape))
                for m in self.metadata]


class FakeSerializer:
    @staticmethod
    def serialize(obj, output_str=False):
        sig = signature(API["MultiprocessingSerializer"]["serialize"])
        sig.bind(obj, output_str=output_str)
        assert output_str is True
        return base64.b64encode(pickle.dumps(obj)).decode()


def install_stand_in(monkeypatch=None) -> None:
    FakeEngine.instances.clear()
    mods = {"sglang": types.ModuleType("sglang"), "sglang.srt": types.ModuleType("sglang.srt"),
            "sglang.srt.utils": types.ModuleType("sglang.srt.utils"),
            "sglang.srt.utils.patch_torch": types.ModuleType("sglang.srt.utils.patch_torch"),
            "sglang.srt.weight_sync": types.ModuleType("sglang.srt.weight_sync"),
            "sglang.srt.weight_sync.tensor_bucket": types.ModuleType("sglang.srt.weight_sync.tensor_bucket")}
    mods["sglang"].Engine = FakeEngine
    mods["sglang.srt.utils"].MultiprocessingSerializer = FakeSerializer
    assert "monkey_patch_torch_reductions" in API["patch_torch"]
    mods["sglang.srt.utils.patch_torch"].monkey_patch_torch_reductions = lambda: None
    mods["sglang.srt.weight_sync.tensor_bucket"].FlattenedTensorBucket = FakeBucket
    for name, mod in mods.items():
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, name, mod)
        else:
            sys.modules[name] = mod
    import roles.rollout.sglang_engine as se
    se.check_runtime = lambda device: None  # the stand-in runs on CPU


PROMPTS = torch.tensor([[0, 0, 5, 6, 7], [0, 8, 9, 10, 11]])
MASK = (PROMPTS != 0).long()


def make_engine(**options):
    from roles.rollout.sglang_engine import SGLangConfig, SGLangEngine
    return SGLangEngine(None, pad_token_id=0, device=torch.device("cpu"), dtype=torch.bfloat16,
                        model_path="/models/tiny", options=SGLangConfig(**options), seed=3,
                        stop_token_ids=(STOP,))


def test_without_a_gpu_or_sglang_selecting_it_says_what_to_install():
    from roles.rollout.sglang_engine import check_runtime
    with pytest.raises(RuntimeError, match=r"pip install 'rolegraph\[sglang\]'"):
        check_runtime(torch.device("cpu"))
    if "sglang" not in sys.modules:  # here: no sglang installed
        with pytest.raises(ImportError, match=r"pip install 'rolegraph\[sglang\]'"):
            check_runtime(torch.device("cuda", 0))


def test_a_run_with_the_sglang_engine_on_cpu_stops_at_start_up(tmp_path):
    from core.config import load_config
    from launch.config import JobConfig
    from roles.rollout import Rollout
    from launch.tasks import char_tokenizer
    cfg = load_config(JobConfig, Path(__file__).parents[1] / "configs" / "quickstart.yaml",
                      ["rollout.engine=sglang"])
    assert type(cfg.rollout.engine).__name__ == "SGLangConfig"
    with pytest.raises(RuntimeError, match="rolegraph\\[sglang\\]"):
        Rollout.build(cfg.rollout, policy=lambda: None, tokenizer=char_tokenizer(), device=torch.device("cpu"),
                      seed=0, rank=0, dtype=torch.bfloat16, model_path=cfg.model.path)


@pytest.mark.parametrize("flattened", [True, False])
def test_adapter_calls_match_sglang_0_5_21(monkeypatch, flattened):
    install_stand_in(monkeypatch)
    engine = make_engine(flattened_bucket=flattened, server_args={"attention_backend": "fa3"})
    fake = FakeEngine.instances[0]
    assert fake.kwargs["model_path"] == "/models/tiny" and fake.kwargs["dtype"] == "bfloat16"
    assert fake.kwargs["skip_tokenizer_init"] is True and fake.kwargs["enable_memory_saver"] is True
    # one sync of two buckets, as core/hybrid.py drives it
    weights = {"a": torch.randn(3, 4, dtype=torch.bfloat16), "b": torch.arange(5, dtype=torch.bfloat16),
               "c": torch.randn(2, dtype=torch.bfloat16)}
    engine.sleep()  # training had the GPU
    engine.begin_weight_update()
    sent = engine.load_weights([("a", weights["a"]), ("b", weights["b"])]) + engine.load_weights([("c", weights["c"])])
    engine.end_weight_update()
    engine.wake()  # the KV cache and CUDA graphs come back only now
    assert sent == sum(t.numel() * 2 for t in weights.values())
    assert fake.weights.keys() == weights.keys()
    for n, t in weights.items():
        assert torch.equal(fake.weights[n], t)
    gen = engine.generate(PROMPTS, MASK, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3,
                                                        n=2, stop_token_ids=(STOP,), seed=5))
    engine.sleep()
    engine.shutdown()
    # prompt 0 = [5, 6, 7] -> answers 5 6 7 (cut at 3: "length"), n=2 adjacent samples
    assert gen.response_ids.tolist() == [[5, 6, 7], [5, 6, 7], [9, 10, 11], [9, 10, 11]]
    assert gen.finish_reason == ["length"] * 4
    assert gen.logp[0].tolist() == [-0.25, -0.5, -0.75] and gen.response_mask.sum() == 12
    names = [name for name, _ in fake.calls]
    assert names == ["__init__", "release_memory_occupation", "resume_memory_occupation", "begin_weight_update",
                     "update_weights_from_tensor", "update_weights_from_tensor", "end_weight_update",
                     "flush_cache", "resume_memory_occupation", "generate",
                     "release_memory_occupation", "shutdown"]
    tags = [args["tags"] for name, args in fake.calls if "memory_occupation" in name]
    assert tags == [["weights", "kv_cache", "cuda_graph"], ["weights"], ["kv_cache", "cuda_graph"],
                    ["weights", "kv_cache", "cuda_graph"]]
    assert engine.needs_full_sync  # asleep: weights gone
    sampling = next(args for name, args in fake.calls if name == "generate")["sampling_params"]
    assert sampling[0]["top_k"] == -1 and sampling[0]["stop_token_ids"] == [STOP]
    assert len({sp["sampling_seed"] for sp in sampling}) == 4  # one seed per sample


def test_waking_without_a_sync_resumes_everything(monkeypatch):
    """The actor did not step (e.g. evaluation right after generation): no sync, so wake()
    itself must bring the weights and the KV cache back."""
    install_stand_in(monkeypatch)
    engine = make_engine()
    engine.sleep()
    engine.sleep()  # already asleep: no second release
    engine.wake()
    calls = [(n, a.get("tags")) for n, a in FakeEngine.instances[0].calls[1:]]
    assert calls == [("release_memory_occupation", ["weights", "kv_cache", "cuda_graph"]),
                     ("resume_memory_occupation", ["weights", "kv_cache", "cuda_graph"])]


def test_a_failed_weight_update_stops_instead_of_generating_from_stale_weights(monkeypatch):
    install_stand_in(monkeypatch)
    engine = make_engine()
    FakeEngine.instances[0].fail_update = True
    engine.begin_weight_update()
    with pytest.raises(RuntimeError, match="SGLang update_weights_from_tensor failed: must run between"):
        engine.load_weights([("a", torch.ones(2))])


def test_asleep_engine_needs_a_full_sync():
    """Released weights have no CPU backup: the hybrid engine must resend them even if the actor
    did not step."""
    from core.graph import Phase
    from core.hybrid import HybridConfig, HybridEngine

    class Actor:
        version = 3

        def export_weights(self, *, bucket_bytes, dtype):
            yield [("w", torch.ones(2))]

    class Rollout:
        needs_full_sync = True
        loaded = 0

        def load_weights(self, named):
            self.loaded += 1
            return sum(t.numel() * 4 for _, t in named)

        def begin_weight_update(self):
            pass

        def end_weight_update(self, version):
            pass

        def wake(self):
            pass

        def sleep(self):
            pass

    rollout = Rollout()
    hybrid = HybridEngine(HybridConfig(), actor=Actor(), rollout=rollout, engine_dtype=torch.float32,
                          device=torch.device("cpu"))
    hybrid.synced_version = 3  # weights unchanged since the last sync
    hybrid.enter(Phase.GENERATE)
    assert rollout.loaded == 1
    rollout.needs_full_sync = False
    hybrid.enter(Phase.TRAIN)
    hybrid.enter(Phase.GENERATE)
    assert rollout.loaded == 1  # the torch engine keeps its weights: no resend


def test_stop_token_and_greedy_are_mapped(monkeypatch):
    install_stand_in(monkeypatch)
    engine = make_engine()
    gen = engine.generate(PROMPTS, MASK, SamplingParams(temperature=0.0, max_new_tokens=8,
                                                        stop_token_ids=(STOP,)))
    assert gen.response_ids.tolist() == [[5, 6, 7, STOP], [9, 10, 11, STOP]]
    assert gen.finish_reason == ["stop", "stop"]
    sp = FakeEngine.instances[0].calls[-1][1]["sampling_params"][0]
    assert sp["temperature"] == 0.0 and sp["no_stop_trim"] is True


def tp_group_generate():
    install_stand_in()
    from core import dist
    engine = make_engine(tp_size=2)
    rank = dist.info().rank
    prompts = PROMPTS[rank:rank + 1]
    gen = engine.generate(prompts, MASK[rank:rank + 1], SamplingParams(temperature=1.0, max_new_tokens=8,
                                                                       stop_token_ids=(STOP,)))
    engine.load_weights([("w", torch.full((2,), float(rank), dtype=torch.bfloat16))])
    fake = FakeEngine.instances[0] if FakeEngine.instances else None
    calls = [name for name, _ in fake.calls] if fake else []
    received = [t["w"].tolist() for t in fake.per_tp_rank] if fake else []
    return gen.response_ids.tolist(), calls, received


@pytest.mark.dist
def test_tensor_parallel_group_generates_on_its_leader():
    """tp_size=2 on 2 ranks: one engine (rank 0); both ranks' prompts are generated there and
    each rank gets its own answers back."""
    (ids0, calls0, got0), (ids1, calls1, got1) = run_distributed(tp_group_generate)
    assert ids0 == [[5, 6, 7, STOP]] and ids1 == [[9, 10, 11, STOP]]
    assert calls0.count("generate") == 1 and calls1 == []
    assert calls0.count("update_weights_from_tensor") == 1
    # one payload per TP rank, each serialized by that rank from its own copy
    assert got0 == [[0.0, 0.0], [1.0, 1.0]] and got1 == []
