# syntax=docker/dockerfile:1
# The training image: CUDA + PyTorch from the base image, the project's requirements, DeepSpeed with fused Adam
# pre-built, a non-root user. See docs/cluster.md ("Container") for build and multi-node use.
#
#   docker build -t bert-distill:latest .
#   docker build --build-arg BASE_IMAGE=nvcr.io/nvidia/pytorch:25.01-py3 -t bert-distill:ngc .
#
# No ENTRYPOINT: the command is given at run time (docker run ... deepspeed launch/pretrain.py --config C; under
# SLURM/pyxis, the srun line of bert-distill-slurm's batch script); the default CMD prints the trainer's usage.
# Base: a *devel* tag (nvcc), needed to pre-build DeepSpeed's CUDA ops.
ARG BASE_IMAGE=pytorch/pytorch:2.8.0-cuda12.8-cudnn9-devel
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# GPUs the pre-built ops target (no GPU at build time): V100, A100, A10/RTX 30, L4/L40/RTX 40, H100, B200.
ARG TORCH_CUDA_ARCH_LIST="7.0;8.0;8.6;8.9;9.0;10.0"
ENV TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST} \
    DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# pdsh + ssh client: for `deepspeed --hostfile` multi-node launch; libaio: DeepSpeed's async I/O (ZeRO-Infinity).
RUN apt-get update \
 && apt-get install -y --no-install-recommends pdsh openssh-client libaio-dev \
 && rm -rf /var/lib/apt/lists/*

# The requirements without torch: the image's CUDA build of torch stays, pinned by a constraint so that no dependency
# replaces it. DeepSpeed is built from source here with fused Adam (DS_BUILD_FUSED_ADAM=1, nvcc of the devel image),
# so no rank JIT-compiles it at start; the other ops stay JIT. The last line fails the build if it was not built.
COPY requirements.txt /tmp/requirements.txt
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/constraints.txt \
 && grep -v -E '^torch([=<>!~ ;]|$)' /tmp/requirements.txt > /tmp/requirements-notorch.txt \
 && pip install --no-cache-dir ninja==1.13.2 \
 && DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 \
    pip install --no-cache-dir --no-build-isolation --no-binary deepspeed \
        -c /tmp/constraints.txt -r /tmp/requirements-notorch.txt \
 && python -c "from deepspeed.git_version_info import installed_ops as ops; assert ops.get('fused_adam'), ops" \
 && rm /tmp/requirements.txt /tmp/requirements-notorch.txt /tmp/constraints.txt

# The code at /workspace, installed editable (pip, no PYTHONPATH): the bert-distill-* commands and `python -m
# pretrain.main` run it from any directory; launch/*.py hand over to the installed modules. A checkout mounted
# elsewhere and run from its root takes precedence (`python -m` searches the working directory first).
# (uid 1000: Ubuntu 24.04 bases, e.g. recent NGC images, already have a user "ubuntu" with it, which goes.)
RUN if id -u 1000 >/dev/null 2>&1; then userdel "$(id -un 1000)"; fi \
 && useradd --create-home --uid 1000 --user-group --shell /bin/bash distill
WORKDIR /workspace
COPY --chown=1000:1000 . /workspace
RUN pip install --no-cache-dir --no-deps -e . \
 && rm -rf /workspace/bert_distill.egg-info \
 && python -c "import pretrain.main, pretrain.slurm, data_prep"
USER 1000:1000

CMD ["python", "launch/pretrain.py", "--help"]
