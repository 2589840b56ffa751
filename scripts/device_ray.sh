#!/usr/bin/env bash
# Carry Ray + decord to the GPU machine (Python 3.12, torch + CUDA, no Ray, no decord, no PyPI).
#
# Here (needs PyPI and .venv; 2.5-5 min on 2 shared cores, most of it xz -9e):
#   bash scripts/device_ray.sh build                  # -> .device/ray-bundle.tar.xz (git-ignored), 32.2 MB
#   bash scripts/device_ray.sh build --python 3.11    # -> .device/ray-bundle-cp311.tar.xz, for this machine
#   bash scripts/device_ray.sh check-local            # build cp311, unpack to a temp dir, run `check` with it
# There (one device call; carry the bundle, run in the repo root):
#   run(carry=[".device/ray-bundle.tar.xz"],
#       command="bash scripts/device_ray.sh run python -m benchmarks.train_step --device cuda ...")
#   bash scripts/device_ray.sh run python scripts/device_ray.py check --gpu  # ray.init, a task, Ray Data,
#                                                   # a 1-GPU-worker TorchTrainer, a decord read (~1 min)
#   bash scripts/device_ray.sh run python -m pytest --noconftest -q tests/test_groupnorm.py  # GN on CUDA
#   eval "$(bash scripts/device_ray.sh unpack)"      # or: just the exports, for several commands in one call
#
# `run`/`unpack` extract once per bundle (sha256 stamp) into .device/ray/ and put on PYTHONPATH the
# bundle's Ray and decord, plus only those bundled deps (PyYAML, jsonschema, requests, pydantic, ...)
# that the device's Python lacks or has at a version Ray rejects. Env: PYTHON (default: .venv's python
# for build, python3 for the rest), BUNDLE, DEST. What is dropped from Ray and why: scripts/device_ray.py.
set -euo pipefail
cd "$(dirname "$0")/.."
here_py=${PYTHON:-.venv/bin/python}
there_py=${PYTHON:-python3}
bundle=${BUNDLE:-.device/ray-bundle.tar.xz}
dest=${DEST:-.device/ray}

cmd=${1:-}
shift || true
case "$cmd" in
  build)
    exec "$here_py" scripts/device_ray.py build "$@" ;;
  unpack)
    exec "$there_py" scripts/device_ray.py unpack --bundle "$bundle" --dest "$dest" "$@" ;;
  run)
    [ $# -gt 0 ] || { echo "usage: $0 run COMMAND [ARGS...]" >&2; exit 2; }
    exports=$("$there_py" scripts/device_ray.py unpack --bundle "$bundle" --dest "$dest")
    eval "$exports"
    exec "$@" ;;
  check-local)
    # the same slimming for this machine's Python, checked end to end with the bundle's deps forced
    # first on PYTHONPATH (--no-prune), so neither the venv's Ray nor its deps can stand in
    ver=$("$here_py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
    tag=cp${ver/./}
    out=.device/ray-bundle-$tag.tar.xz
    [ -f "$out" ] && [ "${REBUILD:-0}" = 0 ] || "$here_py" scripts/device_ray.py build --python "$ver" --out "$out"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    exports=$("$here_py" scripts/device_ray.py unpack --bundle "$out" --dest "$tmp/ray" --no-prune)
    eval "$exports"
    "$here_py" scripts/device_ray.py check "$@" ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    [ -z "$cmd" ] || [ "$cmd" = -h ] || [ "$cmd" = --help ] || exit 2 ;;
esac
