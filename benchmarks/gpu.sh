#!/usr/bin/env bash
# The one prepared GPU run: the whole test suite with the CUDA-marked and torchvision/timm tests
# included, the model benchmark (torchvision ResNet-18 vs ResNet-34, 224 x 224, batch 256, 2048
# images; blocks and all leaves; the forward floor, cka at each gram_precision, torch_cka 0.21 and
# pytorch-cka), the core benchmark and the JAX benchmark, each writing its results as it goes.
#
# Usage:  bash benchmarks/gpu.sh OUT_DIR [WHEEL_DIR]            (PYTHON=... picks the interpreter)
#         bash benchmarks/gpu.sh --cpu OUT_DIR [WHEEL_DIR]     (the same steps, small, on the CPU)
#
# Needs no network. It assumes CUDA torch, torchvision, timm, transformers, JAX with CUDA and CPU
# onnxruntime are installed in `python3` (the device image), installs this checkout with
# `pip install --no-deps --no-build-isolation`, and the peers from wheel files in WHEEL_DIR with
# `--no-index`: torch_cka-0.21-*.whl beside cka, pytorch_cka-*.whl in its own venv (it is also
# imported as `cka`). Missing wheels skip those peers, with a note in the summary.
# Writes OUT_DIR/summary.md (one markdown table per step) and OUT_DIR/results.json, plus each
# step's log; a step that fails is recorded and the next one still runs.
set -uo pipefail

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then MODE=cpu; shift; fi
OUT=${1:?usage: bash benchmarks/gpu.sh [--cpu] OUT_DIR [WHEEL_DIR]}
WHEELS=${2:-}
PY=${PYTHON:-python3}
HERE=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$HERE"
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
STATUS="$OUT/status.txt"
: >"$STATUS"

step() {  # step NAME TIMEOUT_S COMMAND...: run, log to OUT/NAME.log, record the exit status
    local name=$1 limit=$2; shift 2
    local start=$SECONDS
    echo "== $name: $*" | tee -a "$OUT/$name.log"
    timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name rc=$rc seconds=$((SECONDS - start))" | tee -a "$STATUS"
    tail -n 3 "$OUT/$name.log"
}

if [[ $MODE == gpu ]]; then
    DEVICE=cuda; EXAMPLES=2048; BATCH=256; REPEATS=3; TEST_WORKERS=8
    CORE_ARGS=(--device cuda --layers 50 100 --n 128 512 --d 512 16384 --repeats 5)
    JAX_ARGS=(--quick --precision)
    MODEL_ARGS=(--models torchvision)
    METHODS=floor,cka,cka-tf32,cka-bf16,pytorch-cka,torch_cka
else
    DEVICE=cpu; EXAMPLES=256; BATCH=64; REPEATS=1; TEST_WORKERS=2
    CORE_ARGS=(--device cpu --quick --repeats 2 --no-jax)
    JAX_ARGS=(--quick --dims 512 --repeats 2)
    MODEL_ARGS=(--models auto)
    METHODS=floor,cka,cka-tf32,cka-bf16,pytorch-cka,torch_cka
fi

# 1. install: this checkout (no deps: the image has them), then the peers from wheel files
step install 300 "$PY" -m pip install -q --no-deps --no-build-isolation -e "$HERE"
PCKA_ARGS=()
if [[ -n "$WHEELS" ]]; then
    TCKA=$(ls "$WHEELS"/torch_cka-*.whl 2>/dev/null | head -n1)
    PCKA=$(ls "$WHEELS"/pytorch_cka-*.whl 2>/dev/null | head -n1)
    [[ -n "$TCKA" ]] && step install-torch_cka 120 "$PY" -m pip install -q --no-index --no-deps "$TCKA"
    [[ -n "$PCKA" ]] && PCKA_ARGS=(--pcka-wheel "$PCKA" --pcka-python /tmp/pcka-venv/bin/python)
fi
"$PY" - >"$OUT/environment.json" <<'EOF'
import importlib, json, platform
out = {"python": platform.python_version()}
for name in ("torch", "torchvision", "timm", "transformers", "jax", "onnxruntime", "numpy", "cka", "torch_cka"):
    try:
        module = importlib.import_module(name)
        out[name] = getattr(module, "__version__", "?")
    except Exception as error:  # a missing or broken package is recorded, not fatal
        out[name] = f"unavailable: {type(error).__name__}: {error}"[:200]
try:
    import torch
    out["cuda"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
except Exception:
    out["cuda"] = None
print(json.dumps(out, indent=1))
EOF

# 2. the whole test suite, CUDA-marked and torchvision/timm tests included where they import
# (CKA_GPU_SH_TESTS narrows it, e.g. to prove the script end to end on a small CPU machine)
step tests 1500 "$PY" -m pytest -q -n "$TEST_WORKERS" -p no:cacheprovider -rs --junitxml="$OUT/tests.xml" ${CKA_GPU_SH_TESTS:-tests}

# 3. the model benchmark: blocks and all leaves, every method side by side in one run
step models 1800 "$PY" benchmarks/compare_models.py --device "$DEVICE" --examples "$EXAMPLES" --batch "$BATCH" \
    --repeats "$REPEATS" --methods "$METHODS" "${MODEL_ARGS[@]}" "${PCKA_ARGS[@]}" \
    --json "$OUT/models.json" --markdown "$OUT/models.md"

# 4. the core benchmark and the JAX benchmark on the same device
step core 900 "$PY" benchmarks/core.py "${CORE_ARGS[@]}"
step jax 900 "$PY" benchmarks/jax_bench.py "${JAX_ARGS[@]}"

# 5. one markdown summary and one JSON file
"$PY" benchmarks/gpu_summary.py "$OUT" && echo "summary: $OUT/summary.md"
