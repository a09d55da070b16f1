#!/usr/bin/env bash
# llama.cpp's OpenAI server (llama-cpp-python[server]) in a venv of its own, built once and cached, for
# benchmarks/serve_load.py to compare posttrain serve against.
#
#   bash benchmarks/llamacpp.sh        # prints the venv's python on the last line of stdout
#
# Cache: benchmarks/.cache/llamacpp/ (ignored by git through benchmarks/.cache/.gitignore, which this
# writes): wheels/ holds the llama-cpp-python wheel, built from source by pip when none is there (about
# 10 minutes on 2 cores; the log goes to build.log); venv/ gets that wheel with its [server] extras
# (uvicorn, fastapi, sse-starlette, starlette-context, pydantic-settings), so nothing of llama.cpp's
# touches the project's .venv. A wheel already built elsewhere can seed the cache: copy it into wheels/.
# A venv that already imports llama_cpp.server is used as it is. LLAMACPP_SPEC (default
# llama-cpp-python) picks what a build builds, e.g. LLAMACPP_SPEC=llama-cpp-python==0.3.36.
# Exit status 1 with a plain "llama.cpp could not be built: ..." on stderr when the build or the venv fails.
set -uo pipefail
cd "$(dirname "$0")/.."
CACHE=benchmarks/.cache/llamacpp
WHEELS=$CACHE/wheels
VENV=$CACHE/venv
PY=${PYTHON:-python3}
SPEC=${LLAMACPP_SPEC:-llama-cpp-python}

mkdir -p "$WHEELS"
# the whole cache stays out of git without an entry in the project's .gitignore
[ -f benchmarks/.cache/.gitignore ] || printf '*\n' > benchmarks/.cache/.gitignore

fail() {
    echo "llama.cpp could not be built: $1" >&2
    exit 1
}

if "$VENV/bin/python" -c "import llama_cpp.server.app" 2>/dev/null; then
    echo "$VENV/bin/python"
    exit 0
fi

wheel=$(ls -t "$WHEELS"/llama_cpp_python-*.whl 2>/dev/null | head -n 1)
if [ -z "$wheel" ]; then
    command -v cmake >/dev/null || "$PY" -c "import cmake" 2>/dev/null || echo "note: no cmake on PATH; pip will fetch one for the build" >&2
    echo "building $SPEC from source with pip (about 10 minutes on 2 cores; log in $CACHE/build.log)" >&2
    # --no-deps: build only llama-cpp-python itself; its dependencies come as wheels when the venv is made
    if ! CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} "$PY" -m pip wheel --no-deps --disable-pip-version-check \
        --no-binary llama-cpp-python -w "$WHEELS" "$SPEC" >"$CACHE/build.log" 2>&1; then
        reason=$(grep -E "error|Error|ERROR" "$CACHE/build.log" | tail -n 3 | tr '\n' ' ' | cut -c1-400)
        fail "pip wheel $SPEC failed (${reason:-see $CACHE/build.log}); full log: $CACHE/build.log"
    fi
    wheel=$(ls -t "$WHEELS"/llama_cpp_python-*.whl 2>/dev/null | head -n 1)
    [ -n "$wheel" ] || fail "pip wheel $SPEC succeeded but left no llama_cpp_python wheel in $WHEELS"
fi

echo "making $VENV with $(basename "$wheel")[server]" >&2
rm -rf "$VENV"
"$PY" -m venv "$VENV" || fail "$PY -m venv $VENV failed"
if ! "$VENV/bin/pip" install -q --disable-pip-version-check "$wheel[server]" >"$CACHE/venv.log" 2>&1; then
    reason=$(grep -E "ERROR" "$CACHE/venv.log" | tail -n 2 | tr '\n' ' ' | cut -c1-400)
    fail "installing $(basename "$wheel")[server] into $VENV failed (${reason:-see $CACHE/venv.log})"
fi
"$VENV/bin/python" -c "import llama_cpp.server.app" 2>"$CACHE/venv.log" || fail "llama_cpp.server does not import in $VENV: $(tail -n 1 "$CACHE/venv.log")"
echo "$VENV/bin/python"
