#!/usr/bin/env bash
# The GPU check, on whatever NVIDIA GPU the machine has, in one run that fits in minutes:
#   1. LLaVA and Qwen2.5-VL conformance with transformers (fixtures/llava, fixtures/qwen2_5_vl)
#      on cuda, f32 and bf16;
#   2. a LLaVA-1.5-7B-shaped checkpoint (random bf16 weights, bench/memory/make_llava_7b_shaped.py,
#      LAYERS decoder layers, 32 = the real shape) and one MISP-DPO training step on it, K = 3
#      (5 sequences of ~700 tokens), bf16, gradient checkpointing, sequence_group 1: step time
#      and peak GPU memory, against transformers + peft with gradient checkpointing on the same
#      step (bench/memory/slice_vs_peft.py).
# Everything it prints is also written under $OUT (or ./gpu-check).
#
# Needs: the CUDA binary built by bench/gpu/build.sh (out/gpu/misp-cuda.gz, or MISP=path), the
# repository's tracked files, python3 with torch (CUDA), transformers and peft, and the
# driver's libcuda.so.1. The CUDA runtime libraries are taken from PyTorch's nvidia packages.
#
#   bash bench/gpu/check.sh                    # the full check (~10 minutes on an H200)
#   LAYERS=2 bash bench/gpu/check.sh           # the 7B-width slice only, quicker
#   DEVICE=cpu MISP=target/release/misp LAYERS=1 bash bench/gpu/check.sh   # the script itself, on a CPU
set -uo pipefail
cd "$(dirname "$0")/../.."
DEVICE=${DEVICE:-cuda}
LAYERS=${LAYERS:-32}
RESULTS=${OUT:-gpu-check}
WORK=${WORK:-/tmp/misp-gpu-check}
PY=${PYTHON:-python3}
mkdir -p "$RESULTS" "$WORK"
LOG=$RESULTS/check.log
exec > >(tee -a "$LOG") 2>&1
status=0
step() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

if [[ -z ${MISP:-} ]]; then
  gunzip -c out/gpu/misp-cuda.gz >"$WORK/misp" && chmod +x "$WORK/misp" || { echo "no out/gpu/misp-cuda.gz: run bench/gpu/build.sh first"; exit 1; }
  MISP=$WORK/misp
fi
if [[ $DEVICE != cpu ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  # cudart, cublas, curand and nvrtc 13 from PyTorch's wheels; libcuda.so.1 from the driver.
  NV=$($PY -c 'import nvidia, os; print(":".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))')
  export LD_LIBRARY_PATH=$NV:${LD_LIBRARY_PATH:-}
fi
"$MISP" --version

step "1. conformance with transformers on $DEVICE"
for fx in llava qwen2_5_vl; do
  for dt in f32 bf16; do
    "$MISP" bench conformance --fixture "fixtures/$fx" --device "$DEVICE" --dtype "$dt" || status=1
  done
done

step "2. a LLaVA-1.5-7B-shaped checkpoint with $LAYERS decoder layers"
if [[ ! -f $WORK/shaped-$LAYERS/model/config.json ]]; then
  $PY bench/memory/make_llava_7b_shaped.py --layers "$LAYERS" --out "$WORK/shaped-$LAYERS" || status=1
fi
"$MISP" bench memory --model-config "$WORK/shaped-$LAYERS/model/config.json" --checkpointing \
  --sequence-group 1 | tee "$RESULTS/memory-prediction.txt"

step "3. one MISP-DPO step on $DEVICE: misp against transformers + peft (gradient checkpointing)"
THREADS=$(nproc)
$PY bench/memory/slice_vs_peft.py --dir "$WORK/shaped-$LAYERS" --device "$DEVICE" \
  --threads "$THREADS" --misp "$MISP" --json-out "$RESULTS/step.json" || status=1

step "done: status $status"
exit $status
