#!/usr/bin/env bash
# `make cuda`: builds atelier-inference and model_tool in release with candle's `cuda` feature on
# a machine with neither a GPU nor a container engine. nvcc, the CUDA headers and the libraries
# candle links come from pinned CUDA 13.0 wheels of PyPI in a venv under $ATELIER_CACHE; the
# driver library (libcuda), which only an NVIDIA driver installs, is replaced at link time by a stub.
#
# Why 13.0 exactly: candle JIT-loads the PTX that nvcc wrote here, and a driver only loads PTX
# of its own CUDA version or older (newer nvcc emits PTX a 13.0 driver refuses); cudarc 0.19
# also takes the CUDA version of its bindings from `nvcc --version`.
#
# Environment: CUDA_COMPUTE_CAP (default 90: H100/H200; 80 A100, 86 A10, 89 L4/L40S) is the
# compute capability the kernels are compiled for; CUDA_TARGET_DIR (default
# $ATELIER_CACHE/target-cuda; not CARGO_TARGET_DIR, which the Makefile sets for the CPU build:
# other features, other artefacts); CARGO_BUILD_JOBS as usual.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${ATELIER_CACHE:-$HOME/.cache/atelier}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_DIR=${CUDA_TARGET_DIR:-$cache/target-cuda}

# The CUDA 13.0 update 2 toolchain and the libraries cudarc and candle-kernels link
# (cuda, nvrtc, curand, cublas, cublasLt, cudart), and CCCL, whose headers cuda_fp16.h includes.
# docker/inference-cuda.Dockerfile runs this script, so it uses the same.
wheels=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
venv=$cache/cuda-13.0
if [ "$(cat "$venv/wheels" 2>/dev/null)" != "${wheels[*]}" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${wheels[@]}"
  echo "${wheels[*]}" >"$venv/wheels"
fi
cuda_home=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13"))')

# The linker wants unversioned names (libcublas.so), the wheels ship only the sonames
# (libcublas.so.13); the binary records the sonames either way. cudarc adds <root>/lib of each
# CUDA_HOME/CUDA_ROOT to the link search path.
link_root=$venv/link
mkdir -p "$link_root/lib"
for lib in cudart nvrtc curand cublas cublasLt; do
  sonames=("$cuda_home/lib/lib$lib.so."[0-9]*)
  ln -sfn "${sonames[0]}" "$link_root/lib/lib$lib.so"
done

# libcuda stub: every driver entry point of cuda.h, each returning CUDA_ERROR_STUB_LIBRARY (34),
# with the driver's soname, so that the binary asks for libcuda.so.1 and the node's driver
# answers. Names come from the preprocessed header, where the versioned names (cuMemAlloc_v2)
# have replaced the macros, as cudarc links them. Where it is loaded for want of a driver, its
# error string says so.
stub=$link_root/lib/libcuda.so
if [ ! -e "$stub" ] || [ "$stub" -ot "$cuda_home/include/cuda.h" ] || [ "$stub" -ot "$0" ]; then
  {
    echo 'int cuGetErrorName(int error, const char **name) { *name = "CUDA_ERROR_STUB_LIBRARY"; return 0; }'
    echo 'int cuGetErrorString(int error, const char **text) {'
    echo '  *text = "no NVIDIA driver on this host: libcuda.so.1 is the link-only stub of scripts/cuda-build.sh";'
    echo '  return 0;'
    echo '}'
    gcc -E -P -I"$cuda_home/include" -x c - <<<'#include <cuda.h>' |
      grep -oE '\bCUresult[[:space:]]+cu[A-Za-z0-9_]+[[:space:]]*\(' |
      sed -E 's/^CUresult[[:space:]]+(cu[A-Za-z0-9_]+).*/\1/' | sort -u |
      grep -vx 'cuGetErrorName\|cuGetErrorString' |
      sed -E 's/.*/int &(void) { return 34; }/'
  } >"$link_root/cuda-stub.c"
  gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$link_root/cuda-stub.c"
  ln -sfn libcuda.so "$link_root/lib/libcuda.so.1"
fi

export PATH=$cuda_home/bin:$PATH CUDA_HOME=$cuda_home CUDA_ROOT=$link_root
cd "$repo"
nvcc --version | tail -n2
start=$(date +%s)
cargo build --locked --release -p atelier-inference --features cuda \
  --bin atelier-inference --example model_tool
elapsed=$(($(date +%s) - start))

release=$CARGO_TARGET_DIR/release
echo "built in ${elapsed}s for compute capability $CUDA_COMPUTE_CAP:"
ls -l "$release/atelier-inference" "$release/examples/model_tool"
cat <<EOF
At run time the binaries need the NVIDIA driver (libcuda.so.1) and the CUDA 13 libraries above;
from these wheels: LD_LIBRARY_PATH=$cuda_home/lib
Without a driver, the stub stands in so that the binary starts and reports the missing GPU:
LD_LIBRARY_PATH=$cuda_home/lib:$link_root/lib $release/atelier-inference --help
EOF
