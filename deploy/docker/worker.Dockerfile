# GPU worker image: `explainctl worker` on a CUDA build of PyTorch.
#
#   docker build -f deploy/docker/worker.Dockerfile -t explainctl-worker:0.1.0 .
#   docker build -f deploy/docker/worker.Dockerfile --build-arg MODELS=vgg19,resnet50 ...
#   docker build ... --build-arg MODELS=timm:convnext_tiny.fb_in22k_ft_in1k,hf:google/vit-base-patch16-224
#
# Build from the repository root (the context). The models named in MODELS (any --model spec:
# torchvision names, timm:, hf-hub:, hf:) are downloaded at build time, torchvision's into
# TORCH_HOME and the Hub's into HF_HOME, and preloaded when a worker starts, so a worker never
# downloads them; with MODELS="" mount your own caches there instead (read-only is fine), and
# run with HF_HUB_OFFLINE=1 to keep workers off the Hub. A job naming another model still
# downloads it on first use unless HF_HUB_OFFLINE=1 (then it fails as model-unavailable).
#
# The base image must have Python 3.11 or newer and torch 2.10 or newer (the worker extra
# asks for it: older loaders could be made to run code from a weights file). Its torch and
# torchvision are kept: pip is told to reuse them rather than fetch builds for another CUDA.
ARG BASE_IMAGE=pytorch/pytorch:2.10.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG MODELS=vgg19

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/opt/explainctl/torch \
    HF_HOME=/opt/explainctl/hf \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

WORKDIR /tmp/explainctl-src
COPY pyproject.toml README.md ./
COPY src ./src
COPY deploy/docker/worker-probe.py /usr/local/bin/explainctl-probe

RUN { pip list --format=freeze | grep -iE '^(torch|torchvision)==' || true; } > /tmp/base-torch.txt \
 && pip install --no-cache-dir --constraint /tmp/base-torch.txt ".[worker,timm,hf]" \
 && chmod 0755 /usr/local/bin/explainctl-probe \
 && explainctl version \
 && rm -rf /tmp/explainctl-src /tmp/base-torch.txt

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/explainctl \
        --shell /usr/sbin/nologin explainctl

# Bake the weights with the worker's own loader, so they land where it will look for them.
# The worker user owns the cache, so a model that is not baked in can still be downloaded.
RUN mkdir -p "${TORCH_HOME}" "${HF_HOME}" \
 && python -c "import sys; from explainctl.spec.contracts import ModelSpec; from explainctl_worker.model import ModelCache; [ModelCache().get(ModelSpec(name=n.strip()), 'cpu') for n in sys.argv[1].split(',') if n.strip()]" "${MODELS}" \
 && chown -R explainctl:explainctl "${TORCH_HOME}" "${HF_HOME}"

# Load the baked models when each worker process starts (comma-separated, as MODELS).
ENV EXPLAINCTL_PRELOAD=${MODELS}

USER 10001
WORKDIR /home/explainctl

# Every Celery node of `explainctl worker --gpus all` must answer a ping through the broker.
# Run the image with another worker command and the probe needs the matching --gpus value.
HEALTHCHECK --interval=60s --timeout=45s --start-period=120s --retries=3 \
    CMD ["explainctl-probe", "--gpus", "all"]

# SIGTERM starts Celery's warm shutdown: the current chunk finishes first (stop timeouts must
# exceed EXPLAINCTL_CHUNK_TIME_LIMIT, see deploy/README.md).
STOPSIGNAL SIGTERM
ENTRYPOINT ["explainctl"]
CMD ["worker", "--gpus", "all"]
