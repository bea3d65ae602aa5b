#!/usr/bin/env bash
# Copies the libtorch shared libraries a runtime image needs out of a torch wheel install,
# keeping the wheel's layout (DEST/torch/lib, DEST/nvidia/*/lib): libtorch's own libraries find
# the CUDA ones through RPATH entries relative to themselves ($ORIGIN/../../nvidia/.../lib),
# so that layout is what lets them load without listing every folder in LD_LIBRARY_PATH.
#
#   stage-libtorch.sh cpu  SITE DEST BINARY   what BINARY links, as ldd resolves it (~440 MB):
#                                             libtorch_cpu, libc10, libgomp, and the two CUDA
#                                             libraries libtorch_cpu links even on CPU
#                                             (cudart, cupti). libtorch_cuda (~450 MB) is left
#                                             out: detectd only dlopens it for --device cuda.
#   stage-libtorch.sh cuda SITE DEST          every library of torch/lib (less the Python
#                                             bindings) and every nvidia/*/lib of a full
#                                             `pip install torch`, for --device cuda.
#
# SITE is the site-packages folder holding torch/ (and nvidia/). Used by docker/Dockerfile;
# runnable on any machine with a torch install, which is how its output was checked.
set -euo pipefail

mode=$1 site=$(readlink -f "$2") dest=$3

case "$mode" in
  cpu)
    binary=$4
    mkdir -p "$dest"
    # Every library ldd resolves inside the wheel install, at the same relative path.
    # Named by the name ldd shows (the SONAME the loader will ask for), copied dereferenced.
    ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 }' | while read -r lib; do
      dir=$(readlink -f "$(dirname "$lib")")
      case "$dir" in
        "$site"/*)
          rel=${dir#"$site"/}/$(basename "$lib")
          install -D -m 0644 "$(readlink -f "$lib")" "$dest/$rel"
          ;;
      esac
    done
    check=("$binary")
    ;;
  cuda)
    mkdir -p "$dest/torch" "$dest/nvidia"
    cp -a "$site/torch/lib" "$dest/torch/"
    # The Python bindings need libpython and are no use to detectd.
    rm -f "$dest/torch/lib/libtorch_python.so"
    for d in "$site"/nvidia/*/lib; do
      pkg=$(basename "$(dirname "$d")")
      mkdir -p "$dest/nvidia/$pkg"
      cp -a "$d" "$dest/nvidia/$pkg/"
    done
    check=("$dest/torch/lib/libtorch_cuda.so")
    ;;
  *)
    echo "usage: $0 cpu SITE DEST BINARY | cuda SITE DEST" >&2
    exit 2
    ;;
esac

# Nothing may be missing with only DEST on the search path. (The NVIDIA driver's libcuda is
# not linked, only dlopened by cudart, so a GPU-less build machine passes this too.)
if LD_LIBRARY_PATH="$dest/torch/lib" ldd "${check[@]}" | grep 'not found'; then
  echo "stage-libtorch: libraries missing from $dest" >&2
  exit 1
fi
if [ ! -e "$dest/torch/lib/libtorch_cpu.so" ]; then
  echo "stage-libtorch: no libtorch_cpu.so inside $site staged" >&2
  exit 1
fi
du -sh "$dest"
