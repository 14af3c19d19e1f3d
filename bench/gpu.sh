#!/usr/bin/env bash
# The whole GPU check (issues 5 and 13), in one run (under 8 minutes on an H100/H200 with 16 CPUs):
# vit_large_patch16_siglip_384.webli with random weights, fp16, resolution 512, on YFCC-like
# shards; passes when the job's steady rate is >= 0.9 x min(model floor, decode floor on all CPUs),
# and says which of the two limits the rate.
#
#   bash bench/gpu.sh [OUT_DIR]                 # the check
#   GPU_CHECK=preflight bash bench/gpu.sh       # only the first step (seconds; also runs without a GPU)
#
# Needs a Python with this project's requirements; on a machine that cannot fetch packages, put
# wheels in .whl/ (they are installed into /tmp/site first; ../shared/device/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp}}"
py="${PYTHON:-python3}"
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
# PYTHONPATH=$PWD on purpose: this script also runs where the project is not pip-installed (a lent GPU
# machine gets a copy of the checkout and the wheels above, not the venv and its editable install), so
# the benches, which import the installed package and edit no sys.path, and Ray's workers (which
# inherit PYTHONPATH) import ilias_ray from this checkout. Where `make` installed it, this changes
# nothing: the same checkout. A throwaway single-user cluster: token auth off, as the README's laptop
# opt-out.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1

# 1. Preflight, before any of the lent minutes go to the benchmark: every import the job needs,
#    and a local Ray cluster that starts and runs a task (on a GPU when there is one).
"$py" - <<'PY'
import importlib, sys, time
t = time.time()
versions = {}
for name in ("torch", "torchvision", "timm", "open_clip", "h5py", "PIL", "pyarrow", "ray", "ray.data", "ilias_ray.job.run"):
    try:
        versions[name] = getattr(importlib.import_module(name), "__version__", "ok")
    except Exception as e:  # noqa: BLE001 - say which one, then stop
        sys.exit(f"preflight: cannot import {name}: {type(e).__name__}: {e}")
print("preflight: imports ok:", ", ".join(f"{k} {v}" for k, v in versions.items()))
import ray, torch
ray.init(address="local", include_dashboard=False, logging_level="WARNING")
gpus = int(ray.cluster_resources().get("GPU", 0))
@ray.remote(num_gpus=1 if gpus else 0)
def where():
    import torch
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
print(f"preflight: ray.init ok: {ray.cluster_resources().get('CPU', 0):.0f} CPUs, {gpus} GPUs; a task ran on: "
      f"{ray.get(where.remote(), timeout=120)} ({time.time() - t:.1f} s)")
ray.shutdown()
PY
[ "${GPU_CHECK:-}" = preflight ] && exit 0

# 2. The check.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
"$py" bench/throughput.py --model vit_large_patch16_siglip_384.webli --resolution 512 --images 8000 \
  --per_shard 1000 --batch_size 128 --skip_reference --workdir /tmp/ilias_ray_bench --json "$out/gpu_bench.json"
"$py" - "$out/gpu_bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
model, decode, e2e = r["model_floor"], r["decode_floor_all_cpus"], r["end_to_end_steady"]
ratio = e2e / min(model, decode)
limit = "the model (GPU)" if model <= decode else "decoding (CPUs)"
print(f"model floor {model} img/s, decode floor {decode} img/s (all CPUs), end to end {e2e} img/s (steady)")
print(f"ratio to min(model, decode) = {ratio:.3f} -> {'PASS' if ratio >= 0.9 else 'FAIL'} (target 0.9); "
      f"the rate is bounded by {limit}")
sys.exit(0 if ratio >= 0.9 else 1)
PY
