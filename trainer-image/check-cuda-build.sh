#!/usr/bin/env bash
# Compiles the trainer with its `cuda` feature on a machine without a GPU or a CUDA
# install, so that a change that breaks the CUDA build shows up before an image build.
#
# The toolkit comes from NVIDIA's PyPI wheels for CUDA 13.0 Update 2 (the CUDA 12
# wheels carry ptxas but no nvcc): nvcc, cicc, the crt/runtime/CCCL headers, and the
# cuBLAS, cuRAND, NVRTC and cudart libraries the trainer links. The wheels unpack into
# one tree (bin/, nvvm/, include/, lib/) that candle-kernels' build (cudaforge: nvcc on
# PATH, CUDA_COMPUTE_CAP) and cudarc's (`nvcc --version`, CUDA_HOME/lib*) both accept.
# No wheel has the driver's libcuda.so, which cudarc links, so the script writes a stub
# of the functions cudarc binds, each returning CUDA_ERROR_STUB_LIBRARY, as the
# toolkit's own lib64/stubs/libcuda.so does. About 0.7 GB of wheels, 1.2 GB unpacked,
# under ${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cuda/.
#
# The image (Containerfile.cuda) builds on CUDA 12.6; this checks the Rust code and
# candle's kernels against 13.0, which catches the trainer's own compile errors but not
# a kernel that only 12.6's nvcc rejects.
#
# Usage: trainer-image/check-cuda-build.sh [extra cargo features, e.g. gloo]
# It builds the crate and its tests with `cuda` (plus the extra features), then runs
# the library's unit tests, which use the CPU, with the stub driver loaded.
#
# Environment:
#   KUBETUNE_CACHE     cache root (default $HOME/.cache/kubetune)
#   CARGO_TARGET_DIR   default <workspace>/target/cuda, apart from the CPU builds
#   CUDA_COMPUTE_CAP   default 80 (A100)
#   PIP                pip command (default: python3 -m pip)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
workspace="$(dirname "$here")"
cuda_dir="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cuda"
wheels="$cuda_dir/wheels-13.0"
root="$cuda_dir/13.0/nvidia/cu13"
pip="${PIP:-python3 -m pip}"

# CUDA 13.0 Update 2's components, as NVIDIA versions each wheel.
packages=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cublas==13.1.0.3
  nvidia-curand==10.4.0.35
)

if [[ ! -e "$cuda_dir/13.0/.done" ]]; then
  mkdir -p "$wheels"
  echo "check-cuda-build: downloading the CUDA 13.0 wheels to $wheels" >&2
  $pip download --quiet --no-deps --dest "$wheels" "${packages[@]}"
  rm -rf "$cuda_dir/13.0"
  for wheel in "$wheels"/*.whl; do
    python3 -m zipfile -e "$wheel" "$cuda_dir/13.0"
  done
  chmod +x "$root"/bin/* "$root"/nvvm/bin/*
  # The names a linker looks for, and the lib64 cudaforge derives from nvcc's path.
  for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sf "$lib" "$root/lib/${lib%%.so*}.so"
  done
  ln -sfn lib "$root/lib64"
  touch "$cuda_dir/13.0/.done"
fi

# The stub driver, from the cudarc version Cargo.lock pins (regenerated when it changes).
cudarc="$(cd "$workspace" && cargo metadata --format-version 1 --locked --features kubetune-trainer/cuda |
  python3 -c 'import json, sys
print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')"
bindings="$(dirname "$cudarc")/src/driver/sys/mod.rs"
stubs="$root/lib/stubs"
if [[ ! -e "$stubs/libcuda.so" || "$bindings" -nt "$stubs/libcuda.so" ]]; then
  mkdir -p "$stubs"
  grep -ohP 'pub unsafe fn \Kcu\w+(?=\()' "$bindings" | sort -u |
    awk '{ print "int " $1 "(void) { return 34; /* CUDA_ERROR_STUB_LIBRARY */ }" }' \
      >"$stubs/libcuda.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda.c"
  ln -sf libcuda.so "$stubs/libcuda.so.1"
fi

export PATH="$root/bin:$PATH" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$workspace/target/cuda}"
features="cuda${1:+,$1}"
cd "$workspace"
cargo build --locked -p kubetune-trainer --features "$features"
cargo test --locked -p kubetune-trainer --features "$features" --no-run
# The binaries need libcuda.so.1 to start at all; the stub stands in for a driver.
LD_LIBRARY_PATH="$root/lib:$stubs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --locked -p kubetune-trainer --features "$features" --lib
