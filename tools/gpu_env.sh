# Source this on a GPU server after `make install GPU=cu112`:  source tools/gpu_env.sh
# mxnet-cu112 dlopens CUDA 11 libraries by soname; the nvidia-*-cu11 wheels keep them in
# site-packages/nvidia/*/lib, which the loader does not search on its own.
_venv="${VENV:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv}"
_venv="$(cd "$_venv" && pwd)"   # absolute, so the path stays valid whatever the working directory
for _lib in "$_venv"/lib/python3*/site-packages/nvidia/*/lib; do
    [ -d "$_lib" ] && LD_LIBRARY_PATH="$_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
done
export LD_LIBRARY_PATH
unset _venv _lib
