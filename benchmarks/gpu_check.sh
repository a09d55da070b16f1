#!/usr/bin/env bash
# posttrain's GPU check: the code paths only a GPU takes (CUDA devices, NCCL, bf16 on CUDA, QLoRA, the
# fast decoder on CUDA, FSDP), run for real through posttrain's CLI, one line per check with its figure.
#
#   bash benchmarks/gpu_check.sh                 # on a CUDA machine: the zoo's small-llama (38.2M), ~5 minutes
#   bash benchmarks/gpu_check.sh --cpu           # what a CPU can do, on tiny-llama (tests/test_gpu_check.py runs it)
#   bash benchmarks/gpu_check.sh --out DIR       # also write DIR/gpu_check.txt and each check's log
#   bash benchmarks/gpu_check.sh --only fsdp,dpo
#
# On a bare GPU machine with torch, transformers, peft and accelerate but no package index and no
# network: make the wheels first where pip works (bash benchmarks/gpu_wheels.sh -> benchmarks/wheels/,
# ignored by git, ~56 MB) and carry that folder. When posttrain does not import here, this installs the
# wheels and posttrain itself (--no-deps, no build isolation, no index) into a private folder
# ($POSTTRAIN_CHECK_SITE, default /tmp/posttrain-site) put first on PYTHONPATH; nothing else changes.
# The checks are benchmarks/gpu_check.py's; the exit status is 1 when one failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import posttrain, pydantic, nltk, punkt, langdetect, gguf, fastapi, uvicorn, openai" 2> /dev/null; then
    SITE=${POSTTRAIN_CHECK_SITE:-/tmp/posttrain-site}
    if ! ls benchmarks/wheels/*.whl > /dev/null 2>&1; then
        echo "posttrain or its dependencies do not import, and there is no benchmarks/wheels/ to install them from:" >&2
        echo "run 'bash benchmarks/gpu_wheels.sh' where pip reaches PyPI, and carry benchmarks/wheels/" >&2
        exit 2
    fi
    pip_install=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
    "${pip_install[@]}" benchmarks/wheels/*.whl
    "${pip_install[@]}" --no-build-isolation .
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed posttrain and $(ls benchmarks/wheels/*.whl | wc -l) wheels into $SITE"
fi
exec "$PY" benchmarks/gpu_check.py "$@"
