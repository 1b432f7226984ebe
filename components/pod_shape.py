"""The GPU pods' shape from their GPU count, at run time: the counts are pipeline parameters, so the CPU and memory
that grow with them are computed in a step of their own and handed to the GPU tasks' resource requests."""

from typing import NamedTuple

from kfp import dsl

from caopd.config.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def gpu_pod_shape(gpus: int, cpu: str, memory: str) -> NamedTuple("PodShape", cpu=str, memory=str):
    """CPU and memory (request and limit) of a pod with ``gpus`` GPUs: ``caopd.config.launch.gpu_pod_shape``, with
    ``cpu`` / ``memory`` replacing the derived values when given."""
    from collections import namedtuple

    from caopd.config.launch import gpu_pod_shape as shape_of

    shape = shape_of(gpus, cpu, memory)
    return namedtuple("PodShape", ["cpu", "memory"])(shape.cpu, shape.memory)
