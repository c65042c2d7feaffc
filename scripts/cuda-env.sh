# Environment for the CUDA build, sourced by the Makefile's CUDA targets, scripts/gpu-check.sh
# and .ci/run. The toolkit comes from PyPI wheels (scripts/cuda-deps.sh installs them).
#
# There is no GPU on the build machines, so the compute capability is set explicitly: 90 is the
# H100/H200 (Hopper). Override CUDA_COMPUTE_CAP for other GPUs.
AUGPRO_CUDA_DEPS="${AUGPRO_CUDA_DEPS:-$HOME/.cache/augpro-cuda}"
# The CUDA 13 wheels all unpack into one tree laid out like a toolkit (bin, include, lib, nvvm).
export CUDA_ROOT="$AUGPRO_CUDA_DEPS/nvidia/cu13"
export CUDA_PATH="$CUDA_ROOT" CUDA_HOME="$CUDA_ROOT" CUDA_TOOLKIT_ROOT_DIR="$CUDA_ROOT"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The wheels are CUDA 13.0 (scripts/cuda-deps.sh says why); cudarc's bindings must match.
export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-13000}"
export PATH="$CUDA_ROOT/bin:$PATH"
export CPATH="$CUDA_ROOT/include${CPATH:+:$CPATH}"
export LIBRARY_PATH="$CUDA_ROOT/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
# At run time the wheels' libraries (cuBLAS, cuRAND, NVRTC, cudart) are found here; libcuda.so.1
# comes from the GPU driver, never from this tree (lib/stubs is only for linking).
export LD_LIBRARY_PATH="$CUDA_ROOT/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The CUDA build has its own target directory, so that the CPU build stays cached.
export AUGPRO_CUDA_TARGET_DIR="${AUGPRO_CUDA_TARGET_DIR:-$HOME/.cache/augpro-target-cuda}"
