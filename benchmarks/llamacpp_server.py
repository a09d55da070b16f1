"""Start llama-cpp-python's OpenAI server, optionally without llama.cpp's extra weight buffers; or probe them.

Run with the llama.cpp venv's Python (``benchmarks/llamacpp.sh`` builds it), never the project's:

    PY=benchmarks/.cache/llamacpp/venv/bin/python
    $PY benchmarks/llamacpp_server.py [--no-extra-bufts] -- --model FILE.gguf --port N ...   # the server
    $PY benchmarks/llamacpp_server.py --probe FILE.gguf [--no-extra-bufts]                   # exit 0 if it decodes

Why this exists: on CPUs with AMX (Sapphire Rapids and later) llama.cpp repacks quantized weights into
an "AMX buffer" and its ``ggml_backend_amx_mul_mat`` can segfault on the first multi-token decode,
depending on the machine (ggml-org/llama.cpp#20824, still open; dspy worked around it by dropping the
AMX build, stanfordnlp/dspy#10079). On the machine this benchmark was written on it crashes on every
prompt longer than one token. llama.cpp's model parameter ``use_extra_bufts`` turns those buffers off
(the AMX one and the CPU "repack" ones), but llama-cpp-python 0.3.x does not expose it as an option, so
``--no-extra-bufts`` sets it in the default model parameters before the server builds its model.
``--probe`` decodes a short prompt in this process so the caller can run it in a subprocess and see
whether the default (fastest) setting survives here before choosing it.
"""

from __future__ import annotations

import argparse
import sys


def disable_extra_bufts() -> None:
    """Make every model llama-cpp-python loads from now on use ``use_extra_bufts = false``."""
    import llama_cpp.llama_cpp as lib

    original = lib.llama_model_default_params

    def params():  # type: ignore[no-untyped-def]
        p = original()
        p.use_extra_bufts = False
        return p

    # llama.py reads the function off this module at each Llama() (llama_cpp.llama_model_default_params()),
    # so replacing the attribute here reaches the server's model.
    lib.llama_model_default_params = params


def probe(gguf: str, threads: int) -> None:
    """Load ``gguf`` and decode a prompt of several tokens; a crash here is what the caller looks for."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=gguf, n_ctx=256, n_threads=threads, n_threads_batch=threads, logits_all=False, verbose=False)
    out = llm.create_completion("The quick brown fox jumps over the lazy dog, and then", max_tokens=4, temperature=0)
    print(f"probe ok: {out['usage']['prompt_tokens']} prompt tokens, {out['usage']['completion_tokens']} generated")


def main() -> None:
    argv = sys.argv[1:]
    server_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, server_args = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-extra-bufts", action="store_true", help="load models with use_extra_bufts=false (no AMX/repack buffers)")
    ap.add_argument("--probe", metavar="GGUF", help="decode a short prompt with GGUF and exit, instead of serving")
    ap.add_argument("--threads", type=int, default=2, help="threads for --probe")
    args = ap.parse_args(argv)
    if args.no_extra_bufts:
        disable_extra_bufts()
    if args.probe:
        probe(args.probe, args.threads)
        return
    from llama_cpp.server.__main__ import main as serve

    sys.argv = [sys.argv[0], *server_args]
    serve()


if __name__ == "__main__":
    main()
