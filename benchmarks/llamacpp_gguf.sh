#!/usr/bin/env bash
# A GGUF of a Hugging Face model folder, made with llama.cpp's own converter, built once and cached.
#
#   bash benchmarks/llamacpp_gguf.sh MODEL_DIR OUTTYPE     # OUTTYPE: f32, bf16, f16, q8_0; prints the .gguf path last
#
# The converter (convert_hf_to_gguf.py and its gguf-py) comes from the source release of the
# llama-cpp-python that benchmarks/llamacpp.sh built (pip download of the same version, unpacked into
# benchmarks/.cache/llamacpp/src/), so the file format matches the llama.cpp that reads it. It runs with the
# project's Python (PYTHON, default python3: torch, transformers and numpy are there) plus sentencepiece,
# installed with pip --target into benchmarks/.cache/llamacpp/convert-deps/ (the converter imports it even
# for BPE tokenizers). Output: benchmarks/.cache/llamacpp/gguf/<folder name>-<OUTTYPE>.gguf, reused when
# present. Exit status 1 with "llama.cpp GGUF could not be made: ..." on stderr when a step fails.
set -uo pipefail
MODEL_DIR=$(cd "$1" && pwd) || { echo "llama.cpp GGUF could not be made: no folder $1" >&2; exit 1; }
OUTTYPE=$2
cd "$(dirname "$0")/.."
CACHE=benchmarks/.cache/llamacpp
PY=${PYTHON:-python3}

fail() {
    echo "llama.cpp GGUF could not be made: $1" >&2
    exit 1
}

OUT=$CACHE/gguf/$(basename "$MODEL_DIR")-$OUTTYPE.gguf
if [ -f "$OUT" ]; then
    echo "$OUT"
    exit 0
fi
VENV_PY=$(bash benchmarks/llamacpp.sh | tail -n 1) || exit 1
version=$("$VENV_PY" -c "import llama_cpp; print(llama_cpp.__version__)") || fail "llama_cpp does not import in $VENV_PY"
SRC=$CACHE/src/llama_cpp_python-$version
CONVERT=$SRC/vendor/llama.cpp/convert_hf_to_gguf.py
if [ ! -f "$CONVERT" ]; then
    mkdir -p "$CACHE/src"
    echo "fetching llama-cpp-python $version's source for its GGUF converter" >&2
    "$PY" -m pip download -q --disable-pip-version-check --no-binary :all: --no-deps -d "$CACHE/src" "llama-cpp-python==$version" \
        >"$CACHE/src/download.log" 2>&1 || fail "pip download llama-cpp-python==$version failed (see $CACHE/src/download.log)"
    tar xzf "$CACHE/src/llama_cpp_python-$version.tar.gz" -C "$CACHE/src" \
        "llama_cpp_python-$version/vendor/llama.cpp/convert_hf_to_gguf.py" \
        "llama_cpp_python-$version/vendor/llama.cpp/conversion" \
        "llama_cpp_python-$version/vendor/llama.cpp/gguf-py" || fail "could not unpack the converter from $CACHE/src/llama_cpp_python-$version.tar.gz"
fi
DEPS=$CACHE/convert-deps
if [ ! -d "$DEPS/sentencepiece" ]; then
    "$PY" -m pip install -q --disable-pip-version-check --target "$DEPS" sentencepiece >"$CACHE/convert-deps.log" 2>&1 \
        || fail "pip install --target $DEPS sentencepiece failed (see $CACHE/convert-deps.log)"
fi
mkdir -p "$CACHE/gguf"
echo "converting $MODEL_DIR to $OUTTYPE GGUF" >&2
PYTHONPATH="$SRC/vendor/llama.cpp/gguf-py:$DEPS" "$PY" "$CONVERT" "$MODEL_DIR" --outtype "$OUTTYPE" --outfile "$OUT.part" \
    >"$CACHE/gguf/convert.log" 2>&1 || { rm -f "$OUT.part"; fail "$CONVERT failed: $(grep -v '^INFO' "$CACHE/gguf/convert.log" | tail -n 1)"; }
mv "$OUT.part" "$OUT"
echo "$OUT"
