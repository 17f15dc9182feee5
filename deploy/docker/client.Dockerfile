# Client image: the light `explainctl` CLI (submit, status, wait, results...), without torch.
#
#   docker build -f deploy/docker/client.Dockerfile -t explainctl-client:0.1.0 .
#   docker run --rm -e EXPLAINCTL_BROKER_URL=... explainctl-client:0.1.0 submit s3://bucket/photos/ --wait
#
# Build from the repository root (the context).
FROM python:3.12-slim

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /tmp/explainctl-src
COPY pyproject.toml README.md ./
COPY src ./src

# A plain install: the [worker] extra (torch, torchvision) stays out, and the build fails if
# anything pulled torch in anyway.
RUN pip install --no-cache-dir . \
 && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
 && explainctl version \
 && rm -rf /tmp/explainctl-src

RUN useradd --system --uid 10001 --user-group --create-home --home-dir /home/explainctl \
        --shell /usr/sbin/nologin explainctl

USER 10001
WORKDIR /home/explainctl

ENTRYPOINT ["explainctl"]
CMD ["--help"]
