#!/usr/bin/env bash
# Create (or reuse) experiments/compat/.venv-compat (transformers 4.x + torch==2.13.0 CPU + safetensors) and
# print its python on stdout. Used by run_compat.sh and check_export.sh.
#
# Environment: COMPAT_TRANSFORMERS (default 4.57.6, the last 4.x release), COMPAT_BASE_PY (default python3).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$HERE/.venv-compat
TF4=${COMPAT_TRANSFORMERS:-4.57.6}
TORCH=2.13.0          # always pinned: an unpinned torch pulls a multi-GB CUDA build
BASE_PY=${COMPAT_BASE_PY:-python3}

venv_ok() {
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" - "$TF4" "$TORCH" <<'EOF' 2>/dev/null
import sys, importlib.metadata as md
want_tf, want_torch = sys.argv[1:3]
ok = md.version("transformers") == want_tf and md.version("torch").split("+")[0] == want_torch
md.version("safetensors")
sys.exit(0 if ok else 1)
EOF
}
if venv_ok; then
    echo "reusing $VENV" >&2
else
    echo "creating $VENV (transformers==$TF4, torch==$TORCH, safetensors)" >&2
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "transformers==$TF4" "torch==$TORCH" safetensors 2>&1 \
        | { grep -v "^WARNING: Location" || true; } >&2
    venv_ok || { echo "compat venv check failed after install ($VENV)" >&2; exit 1; }
fi
latest4=$("$VENV/bin/python" -m pip index versions transformers 2>/dev/null \
    | sed -n 's/^Available versions: //p' | tr ',' '\n' | tr -d ' ' | grep '^4\.' | head -1 || true)
if [[ -n $latest4 && $latest4 != "$TF4" ]]; then
    echo "note: the newest transformers 4.x on the index is $latest4, this run uses $TF4 (COMPAT_TRANSFORMERS)" >&2
fi
echo "$VENV/bin/python"
