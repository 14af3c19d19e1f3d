#!/usr/bin/env bash
# The whole GPU check of issue 5, in one run (under 8 minutes on an H100/H200 with 16 CPUs):
# vit_large_patch16_siglip_384.webli with random weights, fp16, resolution 512, on YFCC-like
# shards; passes when the job's steady rate is >= 0.9 x min(model floor, decode floor on all CPUs).
#
#   bash bench/gpu.sh [OUT_DIR]
#
# Needs a Python with this project's requirements; on a machine that cannot fetch packages, put
# wheels in .whl/ (they are installed into /tmp/site first).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$py" bench/bench.py --model vit_large_patch16_siglip_384.webli --resolution 512 --images 8000 \
  --per_shard 1000 --batch_size 128 --skip_reference --workdir /tmp/ilias_ray_bench --json "$out/gpu_bench.json"
"$py" - "$out/gpu_bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
bound = min(r["model_floor"], r["decode_floor_all_cpus"])
ratio = r["end_to_end_steady"] / bound
print(f"end to end {r['end_to_end_steady']} img/s / min(model {r['model_floor']}, decode {r['decode_floor_all_cpus']})"
      f" = {ratio:.3f} -> {'PASS' if ratio >= 0.9 else 'FAIL'} (target 0.9)")
sys.exit(0 if ratio >= 0.9 else 1)
PY
