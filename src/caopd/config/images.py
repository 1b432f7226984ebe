"""The container images the components and the training jobs run in: the one place they are named (images/ builds
them). In the library, not in caopd.components, because a component body imports it inside a KFP executor."""

from caopd import __version__

CPU_IMAGE = f"ghcr.io/caopd/caopd-cpu:{__version__}"
GPU_IMAGE = f"ghcr.io/caopd/caopd-gpu:{__version__}"
# Both images run as HOME=/home/caopd (images/*/Dockerfile): downloads go under its .cache — the models and datasets
# fetched from s3:// and the registry (caopd.tracking.sources) and Hugging Face hub models.
IMAGE_CACHE_DIR = "/home/caopd/.cache"
