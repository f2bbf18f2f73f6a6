#!/usr/bin/env bash
# Builds misp's CUDA binary on a machine without a GPU or a system CUDA, and packs what
# bench/gpu/check.sh needs on the GPU machine into out/gpu/ (gitignored; carried as one folder).
#
# How (docs/design.md, "Devices"): the CUDA 13.0 toolkit comes from PyPI into a venv (pinned:
# a newer nvcc emits PTX a 580 driver rejects); candle's cudarc links dynamically, so the linker
# gets a folder of symlinks to the toolkit's libraries plus a stub libcuda.so (every cu* entry
# point of cudarc's driver bindings, each returning CUDA_ERROR_STUB_LIBRARY = 34), used for
# linking only and never shipped. The binary is stripped and gzipped (~17 MB) so that it fits
# the 64 MiB a GPU run can carry. About 13 minutes cold on two cores (most of it nvcc building
# candle's kernels), seconds when only misp changed.
#
#   bash bench/gpu/build.sh                      # writes out/gpu/misp-cuda.gz
#   CUDA_COMPUTE_CAP=80 bash bench/gpu/build.sh  # another GPU generation (default 90: H100/H200)
#   bash bench/gpu/build.sh --prepare-only       # the toolkit and the link folder, no build
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
TOOLS=${MISP_CUDA_TOOLS:-$ROOT/out/cuda-toolkit}
CAP=${CUDA_COMPUTE_CAP:-90}

if [[ ! -x $TOOLS/venv/bin/python ]]; then
  python3 -m venv "$TOOLS/venv"
  "$TOOLS/venv/bin/pip" install -q nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 \
    nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-cublas==13.0.2.14
fi
C=$("$TOOLS/venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[[ -x $C/bin/nvcc ]] || { echo "no nvcc under $C: remove $TOOLS and run again" >&2; exit 1; }

# The link-only folder: libraries by their unversioned names, and the driver stub.
LINK=$TOOLS/linkroot
mkdir -p "$LINK/lib"
for l in cublas cublasLt nvrtc cudart; do ln -sf "$(ls "$C"/lib/lib$l.so.13* | head -1)" "$LINK/lib/lib$l.so"; done
ln -sf "$(ls "$C"/lib/libcurand.so.10* | head -1)" "$LINK/lib/libcurand.so"
if [[ ! -f $LINK/lib/libcuda.so ]]; then
  cargo fetch --locked >/dev/null
  SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys | tail -1)
  grep -rhoE '\bfn cu[A-Za-z0-9_]+\(' "$SYS" | grep -oE 'cu[A-Za-z0-9_]+' | sort -u |
    sed 's/.*/int &(void) { return 34; }/' >"$LINK/stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$LINK/lib/libcuda.so" "$LINK/stub.c"
  echo "stub libcuda.so: $(wc -l <"$LINK/stub.c") entry points from $SYS"
fi

if [[ ${1:-} == --prepare-only ]]; then
  echo "toolkit: $C; link folder: $LINK"; exit 0
fi
export PATH=$C/bin:$PATH NVCC=$C/bin/nvcc CUDA_HOME=$C CUDA_ROOT=$LINK CUDA_PATH=$LINK \
  CUDA_COMPUTE_CAP=$CAP CUDARC_CUDA_VERSION=13000
CARGO_TARGET_DIR=$ROOT/target-cuda cargo build --release --locked -p misp-cli --features cuda
mkdir -p out/gpu
strip -o out/gpu/misp-cuda target-cuda/release/misp
gzip -9f out/gpu/misp-cuda
ls -l out/gpu/misp-cuda.gz
echo "next, on the GPU machine (carry out/gpu): bash bench/gpu/check.sh"
