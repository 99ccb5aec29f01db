#!/usr/bin/env bash
# Rebuild the committed p4c output: BMv2 JSON and P4Info (text) of token_router
# and of the benchmark baseline, and tokenfabric/p4names.py (token_router's names,
# ids, sizes and enum values, by gen_p4names.py). Usage: p4src/build.sh [OUTPUT_DIR]
# (default p4src/build; tests pass a temporary directory to check freshness, and
# then p4names.py is written there too). Paths are relative to p4src/ so that the
# output does not depend on the checkout. PYTHON: an interpreter with the
# p4runtime protobufs (default: the checkout's .venv, else python3).
set -euo pipefail
cd "$(dirname "$0")"
out="${1:-build}"
names="$out/p4names.py"
[ $# -ge 1 ] || names=../tokenfabric/p4names.py
mkdir -p "$out"
if ! command -v p4c-bm2-ss >/dev/null && [ -x /opt/p4/bin/p4c-bm2-ss ]; then
  export PATH="/opt/p4/bin:$PATH"
  export LD_LIBRARY_PATH="/opt/p4/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  [ -x ../.venv/bin/python ] && PYTHON=../.venv/bin/python
fi
compile() {  # compile SOURCE NAME
  p4c-bm2-ss --arch v1model --std p4-16 \
    -o "$out/$2.json" \
    --p4runtime-files "$out/$2.p4info.txtpb" \
    "$1"
}
compile token_router.p4 token_router
compile bench/forward.p4 forward
"$PYTHON" gen_p4names.py "$out/token_router.p4info.txtpb" include/defines.p4 "$names"
