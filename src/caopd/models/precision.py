"""The student's compute precision: float32 throughout, or bfloat16 compute over float32 master weights.

bf16 keeps every trained weight, its gradient and AdamW's moments in float32 and runs the matmuls in bfloat16: under
FSDP the all-gathered parameters are bfloat16 (``MixedPrecisionPolicy``, gradients reduced in float32), and every
forward runs under ``torch.autocast`` (which also casts a replicated model's float32 weights for its matmuls, keeps
the ops autocast lists as float32 in float32, and runs the backward in the forward's dtypes). The loss is computed
from float32 logits (``caopd.training.losses``). Weights that never train — a frozen teacher's copy, a LoRA base —
are stored in bfloat16 outright.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from caopd.method.types import Precision

COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype matmuls run in (and frozen weights are stored in)."""
    return COMPUTE_DTYPES[precision]


def model_device_type(model: torch.nn.Module) -> str:
    return next(model.parameters()).device.type


@contextlib.contextmanager
def compute_precision(precision: Precision, device_type: str) -> Iterator[None]:
    """Forwards (and so their backwards) in the precision's dtype: autocast to bfloat16, or nothing at all for
    float32 (the numbers of an fp32 run are exactly those without this context)."""
    if precision == "fp32":
        yield
        return
    with torch.autocast(device_type=device_type, dtype=compute_dtype(precision)):
        yield
