#!/usr/bin/env bash
# The wheels the project needs beyond the GPU machine's image, for an offline install there.
#
#   bash tools/gpu_wheels.sh DIR        # here (needs PyPI); then on the GPU machine:
#   pip install --no-index --no-deps --target /tmp/deps DIR/*.whl
#
# The image (docs/gpu.md, "When a GPU is available") has Python 3.12, torch 2.11 (CUDA 13),
# transformers, tokenizers, safetensors, pyyaml, numpy, pyarrow, tqdm, peft, accelerate, pytest
# and their requirements (sympy, regex, packaging, ...). What the project imports beyond them:
# torchdata (core/data.py) and math-verify with latex2sympy2_extended and the antlr4 runtime
# (roles/scorers.py). Not included: mlflow (not imported with tracking.enabled=false), sglang
# (hundreds of MB), and torchdata's declared requests/urllib3 (torchdata.stateful_dataloader
# imports neither). Each wheel is downloaded alone (--no-deps), at the version installed in
# $PYTHON's environment (the one the suite runs with), for CPython 3.12 on manylinux x86-64.
# tests/test_gpu_tools.py installs the set next to the image's packages only and runs
# tools/gpu_check.py from it, which proves the set complete.
set -euo pipefail

usage="usage: bash tools/gpu_wheels.sh DIR"
dir=${1:?$usage}
python=${PYTHON:-python}
packages=(torchdata math-verify latex2sympy2_extended antlr4-python3-runtime)
max_bytes=$((60 * 1024 * 1024))

pins=$("$python" - "${packages[@]}" <<'EOF'
import importlib.metadata as md
import sys

missing = []
for name in sys.argv[1:]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        missing.append(name)
if missing:
    sys.exit(f"gpu_wheels.sh: {', '.join(missing)} not installed in {sys.executable}'s environment "
             f"(install the project first: pip install -e .)")
EOF
)

mkdir -p "$dir"
rm -f "$dir"/*.whl  # exactly this set: nothing left over from an older one
# shellcheck disable=SC2086  # one argument per pin
"$python" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
    --dest "$dir" $pins

total=0
count=0
for wheel in "$dir"/*.whl; do
    size=$(stat -c %s "$wheel")
    printf '%10d  %s\n' "$size" "$(basename "$wheel")"
    total=$((total + size))
    count=$((count + 1))
done
awk -v n="$count" -v b="$total" 'BEGIN { printf "total: %d wheels, %d bytes (%.2f MiB)\n", n, b, b / 1048576 }'
if [ "$total" -gt "$max_bytes" ]; then
    echo "gpu_wheels.sh: $total bytes is over the 60 MiB that one call to the GPU machine may carry" >&2
    exit 1
fi
