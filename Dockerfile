# The image of infra/kuberay-rayjob.yaml: Ray's own GPU image, the pinned dependencies, this repository at /app.
#   docker build -t <registry>/clman:0.1.0 . && docker push <registry>/clman:0.1.0
# The tag is pyproject.toml's version (the RayJob names it); the FROM line follows its Ray pin and the
# package list is infra/requirements.txt: both are written by `python scripts/sync_deps.py` from
# pyproject.toml and checked by tests/test_manifests.py, which cannot build images (CI has no Docker).
#
# CUDA: torch and torchvision come from PyPI's default Linux wheels, which carry their own CUDA 13.0
# user-space libraries as nvidia-*-cu13 wheels (pinned in requirements.lock, the same wheels the tests
# run), so the base image's CUDA toolkit is not what torch uses; GPU nodes need an NVIDIA driver that
# runs CUDA 13.0 (>= 580). For older drivers build against a PyTorch index that has these torch and
# torchvision versions for your CUDA, e.g. --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
FROM rayproject/ray:2.60.0-py311-gpu

ARG TORCH_INDEX_URL=""

# Dependencies first, so that a code change rebuilds only the last layers.
COPY --chown=ray:users infra/requirements.txt requirements.lock /tmp/clman/
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        -r /tmp/clman/requirements.txt -c /tmp/clman/requirements.lock \
    && python -c "import ray, torch, torchvision"

# The repository at /app: the RayJob's runtime env uses it as working_dir (python -m jobs.<name>).
COPY --chown=ray:users . /app
RUN pip install --no-cache-dir --no-deps /app
WORKDIR /app
