"""Record the parts of SGLang's API that roles/rollout/sglang_engine.py calls, from a release wheel,
without importing it (SGLang cannot be imported without CUDA):

    pip download sglang==0.5.21 --no-deps -d /tmp/sgl
    python tools/sglang_api.py /tmp/sgl/sglang-0.5.21-*.whl > tests/data/sglang_api_0.5.21.json

tests/test_sglang_engine.py runs the adapter against an stand-in built from this record, so a
call with a parameter the release does not have fails the test.
"""
from __future__ import annotations

import ast
import json
import sys
import zipfile

ENGINE_METHODS = ("__init__", "generate", "update_weights_from_tensor", "flush_cache",
                  "release_memory_occupation", "resume_memory_occupation", "begin_weight_update",
                  "end_weight_update", "shutdown")
FIELD_FILES = ("sglang/srt/arg_groups/fields/", "sglang/srt/arg_groups/arg_utils.py")


def params(fn: ast.FunctionDef) -> dict[str, list[str]]:
    a = fn.args
    static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    return {"positional": [x.arg for x in a.posonlyargs + a.args][0 if static else 1:],
            "keyword_only": [x.arg for x in a.kwonlyargs],
            "var_keyword": a.kwarg is not None}


def methods_of(tree: ast.Module, cls: str, names) -> dict:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return {f.name: params(f) for f in node.body
                    if isinstance(f, ast.FunctionDef) and (names is None or f.name in names)}
    raise KeyError(cls)


def main(wheel: str) -> None:
    z = zipfile.ZipFile(wheel)
    read = lambda path: ast.parse(z.read(path).decode())  # noqa: E731
    version = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    fields = set()
    for name in z.namelist():
        if name.startswith(FIELD_FILES) and name.endswith(".py"):
            for node in ast.walk(read(name)):
                if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    fields.add(node.target.id)
    consts = {}
    for node in read("sglang/srt/constants.py").body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            consts[node.targets[0].id] = node.value.value
    sampling = [n.target.id for n in ast.walk(read("sglang/srt/sampling/sampling_params.py"))
                if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
    record = {
        "release": version.split("/")[0].removesuffix(".dist-info"),
        "Engine": methods_of(read("sglang/srt/entrypoints/engine.py"), "Engine", ENGINE_METHODS),
        "FlattenedTensorBucket": methods_of(read("sglang/srt/weight_sync/tensor_bucket.py"),
                                            "FlattenedTensorBucket", None),
        "MultiprocessingSerializer": methods_of(read("sglang/srt/utils/common.py"),
                                                "MultiprocessingSerializer", None),
        "server_args": sorted(fields),
        "sampling_params": sorted(set(sampling)),
        "memory_tags": sorted(v for k, v in consts.items() if k.startswith("GPU_MEMORY_TYPE_")),
        "patch_torch": sorted(n.name for n in read("sglang/srt/utils/patch_torch.py").body
                              if isinstance(n, ast.FunctionDef)),
    }
    json.dump(record, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
