#!/usr/bin/env bash
# Installs what `cargo build --features cuda` needs, from PyPI, into $AUGPRO_CUDA_DEPS
# (default ~/.cache/augpro-cuda): nvcc, the CUDA headers and the libraries that candle links
# (cudart, cuBLAS/cuBLASLt, cuRAND, NVRTC). Idempotent: a stamp records the pinned set.
#
# Why CUDA 13: the cu12 `nvidia-cuda-nvcc-cu12` wheels (12.0 to 12.9) ship ptxas and libnvvm but
# no `nvcc` driver, `cicc` or `cudafe++`, so they cannot compile candle's kernels. The CUDA 13
# wheels ship the full compiler. 13.0 rather than a later 13.x: candle loads its kernels as PTX,
# which the driver compiles at run time and only accepts from a toolkit no newer than itself,
# so the oldest CUDA 13 runs on the most drivers (the 580 series and newer).
#
# libcuda.so belongs to the GPU driver and is on no package index. Linking needs one, so a stub
# with the driver API's symbol names (taken from cuda.h) is built into lib/stubs, as the
# toolkit's own stub does; at run time the driver's libcuda.so.1 is loaded instead.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
# shellcheck source=scripts/cuda-env.sh
source "$here/cuda-env.sh"

PKGS=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-nvrtc==13.0.88
  nvidia-cuda-cccl==13.0.85
  nvidia-cublas==13.0.2.14
  nvidia-curand==10.4.0.35
)
stamp="$AUGPRO_CUDA_DEPS/.installed"
want="${PKGS[*]} stub-v1"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$CUDA_ROOT/bin/nvcc" ]; then
  exit 0
fi

echo "installing the CUDA toolkit wheels into $AUGPRO_CUDA_DEPS"
rm -rf "$AUGPRO_CUDA_DEPS"
mkdir -p "$AUGPRO_CUDA_DEPS"
pip=(python3 -m pip install -q --no-deps --disable-pip-version-check --target "$AUGPRO_CUDA_DEPS")
"${pip[@]}" "${PKGS[@]}" 2>/dev/null || "${pip[@]}" --break-system-packages "${PKGS[@]}"

lib="$CUDA_ROOT/lib"
# The wheels carry only versioned sonames; the linker looks for the plain names.
for so in "$lib"/lib*.so.*; do
  base="$(basename "$so")"
  plain="${base%%.so.*}.so"
  [ -e "$lib/$plain" ] || ln -s "$base" "$lib/$plain"
done

# The driver stub: every cu* name in cuda.h (macro names and their versioned targets alike).
mkdir -p "$lib/stubs"
grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$CUDA_ROOT/include/cuda.h" | sort -u \
  | awk '{print "void " $1 "(void) {}"}' >"$lib/stubs/cuda_stub.c"
cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$lib/stubs/libcuda.so" "$lib/stubs/cuda_stub.c"
rm "$lib/stubs/cuda_stub.c"

nvcc --version | tail -2
echo "$want" >"$stamp"
echo "CUDA toolkit ready in $CUDA_ROOT"
