"""Thin KFP v2 components, one module per stage; installed as ``caopd.components``.

Each component moves artifacts and builds its stage's typed config (which validates it); the method itself
lives in ``caopd.stages``. Imports sit inside the component bodies because KFP ships each body on its own.
"""

from caopd.components.calibration_evaluation import calibration_evaluation
from caopd.components.continual import (
           continual_distillation,
           continual_enabled,
           continual_evaluation,
)
from caopd.components.data_preparation import data_preparation
from caopd.components.model_registration import model_registration
from caopd.components.opd_training import opd_training, training_arms
from caopd.components.pod_shape import gpu_pod_shape
from caopd.components.rollout_estimation import (
           merge_rollout_shards,
           rollout_estimation,
           rollout_shard_indices,
)
from caopd.components.target_replacement import target_replacement

__all__ = ["calibration_evaluation", "continual_distillation", "continual_enabled", "continual_evaluation",
           "data_preparation", "gpu_pod_shape", "merge_rollout_shards", "model_registration",
           "opd_training", "rollout_estimation", "rollout_shard_indices", "target_replacement", "training_arms"]
