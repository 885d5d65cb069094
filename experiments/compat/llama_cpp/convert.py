"""Run llama.cpp's convert_hf_to_gguf.py on a checkpoint whose BPE pre-tokenizer llama.cpp does not know.

The embedded reference model's tokenizer (byte-level BPE + one-digit pre-tokens) is not in
llama.cpp's table of known pre-tokenizers, so the stock converter stops with "BPE pre-tokenizer
was not recognized". This wrapper answers that question with --pre (default "gpt-2") and then runs
the stock converter unchanged. The GGUF's *tokenizer* is therefore NOT claimed to match the HF
one (the digit splitting differs); the compat check feeds llama.cpp the HF token ids instead.

    python convert.py LLAMA_CPP_DIR HF_CHECKPOINT OUT.gguf [--pre gpt-2]
"""

from __future__ import annotations

import sys
from pathlib import Path


def main() -> int:
    args = sys.argv[1:]
    pre = "gpt-2"
    if "--pre" in args:
        i = args.index("--pre")
        pre = args[i + 1]
        del args[i:i + 2]
    if len(args) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    llama_dir, ckpt, out = (Path(a).resolve() for a in args)
    sys.path[:0] = [str(llama_dir), str(llama_dir / "gguf-py")]
    import conversion.base as base

    def fixed_pre(self, tokenizer) -> str:  # noqa: ARG001 - signature of TextModel.get_vocab_base_pre
        return pre

    base.TextModel.get_vocab_base_pre = fixed_pre
    sys.argv = ["convert_hf_to_gguf.py", str(ckpt), "--outtype", "f32", "--outfile", str(out)]
    import runpy

    runpy.run_path(str(llama_dir / "convert_hf_to_gguf.py"), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
