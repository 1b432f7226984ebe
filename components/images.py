"""The container images the components run in: the one place they are named (images/ builds them)."""

from caopd import __version__

CPU_IMAGE = f"ghcr.io/caopd/caopd-cpu:{__version__}"
GPU_IMAGE = f"ghcr.io/caopd/caopd-gpu:{__version__}"
