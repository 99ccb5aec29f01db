#!/usr/bin/env bash
# Compile mini.p4 for BMv2: mini.json and mini.p4info.txtpb next to it (or into $1).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here}"
export PATH="/opt/p4/bin:$PATH"
export LD_LIBRARY_PATH="/opt/p4/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$here"  # relative source paths keep the output the same wherever it is written
p4c-bm2-ss --arch v1model --std p4-16 -o "$out/mini.json" \
    --p4runtime-files "$out/mini.p4info.txtpb" mini.p4
