#!/usr/bin/env bash
# The wheels tools/gpu_check.sh carries to a lent GPU machine (the device tool: nothing can be
# fetched there; its image has Python 3.12, torch, transformers, numpy, einops, pyyaml, pillow,
# pytest, but none of the packages below). Run here, in the repository root, once per session
# that has a GPU: it fills .whl/ (git-ignored) with the versions of this project's environment
# for CPython 3.12 on x86-64 Linux, about 10 MB. DeepSpeed ships only a source archive: it is
# built here into a pure-Python wheel without prebuilt ops (DS_BUILD_OPS=0, as pip does by default).
# Then: the device tool's run with carry [".whl", ".bench/openflamingo"] and the command
# `bash tools/gpu_check.sh` (make .bench/openflamingo/open_flamingo first for the comparison).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
rm -f .whl/*.whl
pkgs=()
for name in megatron-core open_clip_torch ftfy wcwidth webdataset braceexpand hjson pydantic pydantic-core \
            annotated-types typing-inspection; do
  pkgs+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d .whl "${pkgs[@]}" einops-exts==0.0.4
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$(version deepspeed)"
ls -1 .whl
du -sh .whl
