#!/usr/bin/env bash
# Lays out what a run on the GPU device machine needs that its image lacks (see BENCHMARKS.md, "On a GPU"):
# Python 3.12 manylinux wheels of the runtime dependencies the GPU benchmarks import (.whl/), at the
# versions installed here, and the o200k vocabulary (.vocab/). Both are git-ignored
# and travel to the device with `carry`. The image already has torch, triton, numpy and safetensors.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if ! command -v "$PY" >/dev/null; then
    echo "device_prep: no Python at $PY (run make setup first, or set PYTHON)" >&2; exit 2
fi
pkgs=()
for p in pydantic pydantic-core annotated-types typing-inspection typing-extensions openai-harmony llguidance; do
    # `|| true`: under pipefail a failing `pip show` would end the script here, before the message below
    v=$("$PY" -m pip show "$p" 2>/dev/null | sed -n 's/^Version: //p' || true)
    [ -n "$v" ] || { echo "device_prep: $p is not installed in $PY (run make setup first, or set PYTHON)" >&2; exit 2; }
    pkgs+=("$p==$v")
done
rm -rf .whl && mkdir -p .whl
plat=()
for n in 2_17 2_24 2_27 2_28 2_31 2_34 2_35; do plat+=(--platform "manylinux_${n}_x86_64"); done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${plat[@]}" --platform manylinux2014_x86_64 -d .whl "${pkgs[@]}"
vocab=${TIKTOKEN_ENCODINGS_BASE:-../shared/vocab}
if [ -f "$vocab/o200k_base.tiktoken" ]; then
    rm -rf .vocab && mkdir -p .vocab && cp "$vocab"/* .vocab/
else
    echo "device_prep: no o200k vocabulary at $vocab (set TIKTOKEN_ENCODINGS_BASE); .vocab/ not made" >&2
fi
du -sh .whl .vocab 2>/dev/null
ls .whl
