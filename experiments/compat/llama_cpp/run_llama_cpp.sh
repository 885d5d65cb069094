#!/usr/bin/env bash
# llama.cpp leg of the compat check (called by ../run_compat.sh when COMPAT_LLAMA_CPP=1).
#
#   bash run_llama_cpp.sh HF_DUMP.json OUT_DIR LABEL=HF_CHECKPOINT [...]
#
# * experiments/compat/.venv-llama: llama-cpp-python built from its PyPI sdist (CPU; no wheel on PyPI, so it
#   compiles llama.cpp: ~20-25 min on 2 cores the first time, reused afterwards);
# * convert.py runs the sdist's vendor/llama.cpp/convert_hf_to_gguf.py with the MAIN venv's python (it needs
#   torch + transformers, which transformers 5 provides; gguf-py comes from the sdist) -> f32 GGUF;
# * dump_llama.py scores and greedily continues the same prompts (HF token ids) and compares with HF_DUMP.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
COMPAT=$(cd "$HERE/.." && pwd)
HF_DUMP=$1
OUT=$2
shift 2
LLAMA_VERSION=${COMPAT_LLAMA_CPP_VERSION:-0.3.36}
VENV=$COMPAT/.venv-llama
CACHE=$COMPAT/.cache
MAIN_PY=${MAIN_PY:?MAIN_PY (python of the main venv) must be set}

mkdir -p "$CACHE"
SDIST=$CACHE/llama_cpp_python-$LLAMA_VERSION.tar.gz
if [[ ! -f $SDIST ]]; then
    python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$LLAMA_VERSION" -d "$CACHE" 2>&1 \
        | { grep -v "^WARNING: Location" || true; }
fi
SRC=$CACHE/llama_cpp_python-$LLAMA_VERSION
[[ -f $SRC/vendor/llama.cpp/convert_hf_to_gguf.py ]] || tar -xzf "$SDIST" -C "$CACHE"

if ! "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$LLAMA_VERSION')" 2>/dev/null; then
    echo "building llama-cpp-python $LLAMA_VERSION from source into $VENV (slow: compiles llama.cpp)"
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} \
    CMAKE_ARGS="-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_OPENMP=OFF" \
        "$VENV/bin/python" -m pip install --quiet "$SDIST" numpy 2>&1 | { grep -v "^WARNING: Location" || true; }
fi

GGUFS=()
for spec in "$@"; do
    label=${spec%%=*}
    ckpt=${spec#*=}
    "$MAIN_PY" "$HERE/convert.py" "$SRC/vendor/llama.cpp" "$ckpt" "$OUT/$label.gguf" > "$OUT/gguf_$label.log" 2>&1 \
        || { tail -20 "$OUT/gguf_$label.log"; exit 1; }
    grep -h "experts used count" "$OUT/gguf_$label.log" | sed "s/^/$label: /"
    GGUFS+=(--gguf "$label=$OUT/$label.gguf")
done
status=0
"$VENV/bin/python" "$HERE/dump_llama.py" --hf-dump "$HF_DUMP" "${GGUFS[@]}" --out "$OUT/llama_cpp.json" \
    | tee "$OUT/compare_llama_cpp.txt" || status=$?
rm -f "$OUT"/*.gguf
exit $status
