#!/usr/bin/env bash
# Do ANY exported checkpoints (pruned, merged, grown, transplanted, ...) load in other runtimes with the same
# results as in transformers 5?
#
#   bash experiments/compat/check_export.sh pruned=/tmp/runs/prune/checkpoint [merged=DIR grown=DIR ...]
#   bash experiments/compat/check_export.sh --source DIR LABEL=DIR ...     # exports of another source model
#
# Runtimes: transformers 5 (main venv; runtime A, the reference), transformers 4.x (.venv-compat, float32 and
# bfloat16), vLLM CPU (.venv-vllm, float32) and, with COMPAT_LLAMA_CPP=1, llama.cpp (f32 GGUF).
# The source model (default: the embedded reference Qwen3-MoE) is dumped too, as label `source`:
#   * it is the baseline of compare.py's non-vacuity check (each export must give outputs that differ from
#     the source's in every runtime, else agreement could mean "export ignored"), and
#   * negative control: for each runtime B, a copy of B's dump in which every export's entry is replaced by
#     the source's entry (a runtime that silently ran the source instead of the export) must be FLAGGED.
# Checks per export and runtime (compare.py): tokenization, greedy tokens identical, max |logprob diff|
# (float32 1e-4; bfloat16 0.125 with near-ties accepted), top-k honoured (config = modules = executed), expert
# count consistent (config keys = loaded config = experts built per layer = router rows), routers loaded as
# stored (transformers: bit-exact; vLLM: gate output vs x @ W_disk^T within 1e-4, see vllm_cpu/dump_vllm.py).
#
# Environment:
#   MOESURGEON_PY     python of the main venv (default <repo>/.venv/bin/python)
#   COMPAT_SOURCE     source model of the exports (default: the embedded reference model); --source overrides
#   COMPAT_TF4=0      skip transformers 4.x          COMPAT_VLLM=0  skip vLLM          COMPAT_LLAMA_CPP=1  add llama.cpp
#   COMPAT_OUT        results folder (default experiments/compat/out/exports; replaced on each run)
# Exit status non-zero if any check fails. Wall time on 2 shared cores: ~3-6 min for one export (+ venv
# creation the first time: 1-4 min for transformers 4, ~10 min for vLLM).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
MAIN_PY=${MOESURGEON_PY:-$ROOT/.venv/bin/python}
SOURCE=${COMPAT_SOURCE:-$ROOT/src/moesurgeon/assets/reference_model}
OUT=${COMPAT_OUT:-$HERE/out/exports}
START=$(date +%s)
log() { printf '\n[check_export %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

if [[ ${1:-} == --source ]]; then SOURCE=$2; shift 2; fi
(( $# > 0 )) || { sed -n '2,9p' "$0" >&2; exit 2; }
[[ -x $MAIN_PY ]] || { echo "main venv python not found: $MAIN_PY (set MOESURGEON_PY)" >&2; exit 2; }
[[ -f $SOURCE/config.json ]] || { echo "source model has no config.json: $SOURCE (set COMPAT_SOURCE or --source)" >&2; exit 2; }
CKPTS=(--checkpoint "source=$SOURCE")
SPECS=("source=$SOURCE")
LABELS=()
for spec in "$@"; do
    label=${spec%%=*}
    dir=${spec#*=}
    [[ $spec == *=* && -n $label && $label != source ]] \
        || { echo "bad export '$spec': expected LABEL=DIR with LABEL not 'source'" >&2; exit 2; }
    [[ -f $dir/config.json ]] || { echo "export '$label': no config.json in $dir (expected a checkpoint dir)" >&2; exit 2; }
    CKPTS+=(--checkpoint "$label=$dir")
    SPECS+=("$label=$dir")
    LABELS+=("$label")
done

if [[ ${COMPAT_TF4:-1} == 1 ]]; then
    TF4_PY=$(bash "$HERE/setup_compat_venv.sh")
fi
if [[ ${COMPAT_VLLM:-1} == 1 ]]; then
    VLLM_PY=$(bash "$HERE/vllm_cpu/setup_venv.sh")
fi
rm -rf "$OUT"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"

dump() {  # dump NAME DTYPE PYTHON SCRIPT
    log "$1 ($2): ${SPECS[*]}"
    # stdout too: vLLM logs to stdout
    env -u PYTHONPATH "$3" "$4" --dtype "$2" --out "$OUT/$1_$2.json" "${CKPTS[@]}" > "$OUT/$1_$2.log" 2>&1 \
        || { tail -40 "$OUT/$1_$2.log"; echo "FAIL: $1 could not load/run a checkpoint (log: $OUT/$1_$2.log)"; return 1; }
}

status=0
PAIRS=()  # "B_NAME DTYPE" compared against tf5
for dtype in float32 bfloat16; do
    dump tf5 "$dtype" "$MAIN_PY" "$HERE/dump_outputs.py" || exit 1
    if [[ ${COMPAT_TF4:-1} == 1 ]]; then
        if dump tf4 "$dtype" "$TF4_PY" "$HERE/dump_outputs.py"; then PAIRS+=("tf4 $dtype"); else status=1; fi
    fi
done
if [[ ${COMPAT_VLLM:-1} == 1 ]]; then
    if dump vllm float32 "$VLLM_PY" "$HERE/vllm_cpu/dump_vllm.py"; then PAIRS+=("vllm float32"); else status=1; fi
fi

if (( ${#PAIRS[@]} == 0 )) && [[ ${COMPAT_LLAMA_CPP:-0} != 1 ]]; then
    echo "FAIL: no runtime was compared with transformers 5 (COMPAT_TF4=0 and COMPAT_VLLM=0, or every dump failed)"
    status=1
fi
for pair in "${PAIRS[@]}"; do
    read -r b dtype <<< "$pair"
    log "compare ($dtype): transformers 5 (A) vs $b (B)"
    python3 "$HERE/compare.py" "$OUT/tf5_$dtype.json" "$OUT/${b}_$dtype.json" --baseline source \
        --allow-tokenizer-fallback --summary "$OUT/summary_${b}_$dtype.json" | tee "$OUT/compare_${b}_$dtype.txt" \
        || status=1
    # negative control: B "ran the source instead of each export" must be flagged for every export
    python3 - "$OUT/${b}_$dtype.json" "$OUT/negative_${b}_$dtype.json" "${LABELS[@]}" <<'EOF'
import json, sys
dump = json.load(open(sys.argv[1]))
for label in sys.argv[3:]:
    dump["checkpoints"][label] = dict(dump["checkpoints"]["source"], label=label)
json.dump(dump, open(sys.argv[2], "w"))
EOF
    python3 "$HERE/compare.py" "$OUT/tf5_$dtype.json" "$OUT/negative_${b}_$dtype.json" --baseline source \
        --allow-tokenizer-fallback > "$OUT/negative_${b}_$dtype.txt" || true
    for label in "${LABELS[@]}"; do
        n=$(grep -c "^FAIL: $label[:/]" "$OUT/negative_${b}_$dtype.txt" || true)
        if (( n > 0 )); then
            echo "negative control ($b, $dtype, $label): flagged as expected, $n failures"
        else
            echo "negative control ($b, $dtype, $label): NOT flagged - the check cannot tell this export from the source"
            status=1
        fi
    done
done

if [[ ${COMPAT_LLAMA_CPP:-0} == 1 ]]; then
    log "llama.cpp (COMPAT_LLAMA_CPP=1)"
    MAIN_PY="$MAIN_PY" bash "$HERE/llama_cpp/run_llama_cpp.sh" "$OUT/tf5_float32.json" "$OUT" "${SPECS[@]}" || status=1
fi

{
    echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "exports: ${SPECS[*]}"
    echo "main venv: $("$MAIN_PY" -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)')"
    [[ -n ${TF4_PY:-} ]] && echo "compat venv: $("$TF4_PY" -c 'import transformers, torch; print("transformers", transformers.__version__, "torch", torch.__version__)')"
    [[ -n ${VLLM_PY:-} ]] && echo "vllm venv: $("$VLLM_PY" -c 'from importlib.metadata import version as v; print("vllm-cpu", v("vllm-cpu"), "transformers", v("transformers"), "torch", v("torch"))')"
    python3 - "$OUT"/summary_*.json <<'EOF'
import json, os, sys
for path in [p for p in sys.argv[1:] if os.path.exists(p)]:
    s = json.load(open(path))
    name = os.path.basename(path)[len("summary_"):-len(".json")]
    print(f"{name:16s} max|dlogprob| {s['max_abs_logprob_diff']:.3g}  greedy identical: {s['greedy_identical_all']}"
          f"  {'PASS' if s['passed'] else 'FAIL'}")
EOF
    echo "wall time: $(( $(date +%s) - START ))s"
    echo "status: $([[ $status == 0 ]] && echo PASS || echo FAIL)"
} | tee "$OUT/run_info.txt"
exit $status
