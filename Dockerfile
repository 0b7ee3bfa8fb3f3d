# simple_cnn: train, test and classify from one image; datasets, models and images are volumes.
#   docker build -t simple_cnn .
#   docker run --rm --user "$(id -u):$(id -g)" -v ./datasets:/app/datasets -v ./models:/app/models \
#     -v ./images:/app/images simple_cnn --mode train
# A slim image for classify and serve only (LiteRT, no TensorFlow):
#   docker build --target classify -t simple_cnn:classify .

FROM python:3.11-slim AS base

# Quiet, unbuffered logs (docker logs shows each epoch as it ends); caches that any
# --user can write, since that user may have no home folder in the image.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=3 \
    KERAS_HOME=/tmp/.keras \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONPATH=/app/src

WORKDIR /app

# A non-root user; the three data folders are theirs (and any --user may write them
# when mounted from the host with the right owner).
RUN useradd --create-home --uid 1000 --user-group simplecnn \
    && mkdir -p datasets models images \
    && chown simplecnn:simplecnn datasets models images
VOLUME ["/app/datasets", "/app/models", "/app/images"]
# serve's port (TensorFlow Serving's REST port): docker run -p 8501:8501 ... --mode serve --host 0.0.0.0
EXPOSE 8501
ENTRYPOINT ["python", "-m", "simple_cnn"]
CMD ["--help"]


# The slim image's packages, installed and then pruned (scripts/prune-slim says what and
# why) in a stage of their own: only the pruned folder reaches the image, not the tools.
FROM base AS classify-packages
# binutils (for strip) is not pinned: it never reaches an image, and whichever release the
# base's Debian carries strips the same.
# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends binutils \
    && rm -rf /var/lib/apt/lists/*
COPY requirements-classify.txt scripts/prune-slim ./
RUN pip install --no-cache-dir --require-hashes --target /opt/packages -r requirements-classify.txt \
    && ./prune-slim /opt/packages

# The slim image: classify and serve, from a model's LiteRT copy.
FROM base AS classify
COPY --from=classify-packages /opt/packages /opt/packages
ENV PYTHONPATH=/app/src:/opt/packages
COPY LICENSE.txt ./
COPY src/ src/
USER 1000:1000


# The full image, and the default target (last): every mode.
FROM base AS full
# Dependencies first, in their own layer: a code change does not reinstall TensorFlow.
# The GPU image: docker build --build-arg REQUIREMENTS=requirements-gpu.txt -t simple_cnn:gpu .
ARG REQUIREMENTS=requirements.txt
COPY ${REQUIREMENTS} ./requirements.txt
RUN pip install --no-cache-dir --require-hashes -r requirements.txt
# Keras' cache on the models volume: ImageNet weights (--backbone) are downloaded once, not
# once per container.
ENV KERAS_HOME=/app/models/.keras
COPY LICENSE.txt ./
COPY src/ src/
USER 1000:1000
