"""LoRA through PEFT: the student's adapters, the teacher that is the base with them off (or an EMA of them), and
the merged weights that the vLLM copy and the registered model get.

The adapters are injected into the student's own modules (``get_peft_model`` wraps the model, and its base is the
very object the trainer runs): forwards, FSDP and activation checkpointing see one model whose LoRA layers add
``(alpha / r)·B·A·x`` to each adapted linear layer. Only the adapters train (PEFT freezes the rest). The frozen
teacher needs no copy of the model: it is the same modules with the adapters off (``disable_adapter``). An EMA teacher
is a second adapter, ``ema``, which follows the student's; scoring switches to it and back.

The merged weight of an adapted layer is ``W + scaling·B·A`` (PEFT's ``LoraLayer.get_delta_weight`` for a plain
``nn.Linear``; ``merge_state_dict`` computes it from names alone, so a gathered (FSDP) state dict merges on rank 0).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from caopd.config.training import LoRAConfig

STUDENT_ADAPTER = "default"  # PEFT's name for the first adapter
EMA_ADAPTER = "ema"
_BASE = ".base_layer."


def add_adapters(model: torch.nn.Module, cfg: LoRAConfig) -> Any:
    """Wrap ``model`` with trainable LoRA adapters (fp32 even over a bf16 base: PEFT's ``autocast_adapter_dtype``);
    the base weights are frozen. Returns the ``PeftModel``; ``model`` itself now holds the LoRA layers."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
                      bias="none")
    with warnings.catch_warnings():  # PEFT reads transformers' pre-5.24 name of the checkpointing flag
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora, adapter_name=STUDENT_ADAPTER, autocast_adapter_dtype=True)


def add_ema_adapter(peft_model: Any) -> None:
    """A frozen second adapter, ``ema``, starting equal to the student's."""
    peft_model.add_adapter(EMA_ADAPTER, peft_model.peft_config[STUDENT_ADAPTER])
    with torch.no_grad():
        for student, ema in adapter_pairs(peft_model.get_base_model()):
            if not student.is_meta:  # a meta-built model (FSDP, rank > 0) gets rank 0's values when sharded
                ema.copy_(student)
            ema.requires_grad_(False)


def adapter_pairs(model: torch.nn.Module) -> Iterator[tuple[torch.nn.Parameter, torch.nn.Parameter]]:
    """(student adapter parameter, its EMA twin), in module order."""
    params = dict(model.named_parameters())
    for name, param in params.items():
        if f".{STUDENT_ADAPTER}." in name and "lora_" in name:
            twin = params.get(name.replace(f".{STUDENT_ADAPTER}.", f".{EMA_ADAPTER}."))
            if twin is not None:
                yield param, twin


@contextlib.contextmanager
def adapters_off(peft_model: Any) -> Iterator[None]:
    """The base model: every adapter bypassed for the block."""
    with peft_model.disable_adapter():
        yield


@contextlib.contextmanager
def ema_adapter_on(peft_model: Any) -> Iterator[None]:
    """The EMA adapter active instead of the student's for the block (scoring only: inside, the student's adapter is
    not trainable); the student's is active and trainable again afterwards, before any backward replays a layer."""
    # the teacher scores deterministically: its adapter's dropout off (the student trains in training mode)
    dropouts = [module.lora_dropout[EMA_ADAPTER] for module in peft_model.get_base_model().modules()
                if hasattr(module, "lora_dropout") and EMA_ADAPTER in module.lora_dropout]
    modes = [dropout.training for dropout in dropouts]
    peft_model.base_model.set_adapter(EMA_ADAPTER, inference_mode=True)
    for dropout in dropouts:
        dropout.eval()
    try:
        yield
    finally:
        for dropout, mode in zip(dropouts, modes):
            dropout.train(mode)
        peft_model.base_model.set_adapter(STUDENT_ADAPTER)
        for _, ema in adapter_pairs(peft_model.get_base_model()):
            ema.requires_grad_(False)


def lora_scaling(cfg: LoRAConfig) -> float:
    """PEFT's scaling of a LoRA update without rsLoRA: alpha / r."""
    return cfg.alpha / cfg.r


def is_adapted(model: torch.nn.Module) -> bool:
    """Whether PEFT tuner layers sit in the model (its forward then differs from its plain weights')."""
    return any(type(module).__module__.startswith("peft.") for module in model.modules())


def merge_state_dict(state: Mapping[str, torch.Tensor], scaling: float,
                     adapter: str = STUDENT_ADAPTER) -> dict[str, torch.Tensor]:
    """A plain model's state dict from an adapted one's (the base model's names, as ``model.state_dict()`` of the
    PEFT-injected model gives them), in float32: each adapted ``….base_layer.weight`` becomes ``….weight`` +
    scaling·B·A, other adapters' tensors are dropped, everything else kept. float32 because a bf16 base plus an update
    smaller than bf16's resolution for its weight (lr 2e-5 makes many) would round back to the base."""
    merged: dict[str, torch.Tensor] = {}
    as_float: dict[tuple, torch.Tensor] = {}  # one float32 copy per storage: tied weights stay one tensor
    for name, tensor in state.items():
        if "lora_" in name:
            continue
        if _BASE in name:
            prefix, leaf = name.split(_BASE, 1)
            if leaf == "weight" and f"{prefix}.lora_A.{adapter}.weight" in state:
                down = state[f"{prefix}.lora_A.{adapter}.weight"].float()
                up = state[f"{prefix}.lora_B.{adapter}.weight"].float()
                tensor = tensor.float() + scaling * (up @ down)
            name = f"{prefix}.{leaf}"
        merged[name] = as_float.setdefault((tensor.data_ptr(), tuple(tensor.shape)), tensor.float())
    return merged


def streamed_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights as a plain model names them, one tensor at a time (whole under FSDP: every process takes
    part in gathering each, in the same order): an adapted layer's weight merged with the student's adapter, the
    adapters themselves left out. A model without adapters yields its parameters as they are."""
    from caopd.models.distributed import full_tensor

    adapted = {name: module for name, module in model.named_modules()
               if hasattr(module, "base_layer") and hasattr(module, "lora_A")}
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        tensor = full_tensor(param.detach())
        if _BASE in name:
            prefix, leaf = name.split(_BASE, 1)
            module = adapted.get(prefix)
            if leaf == "weight" and module is not None and STUDENT_ADAPTER in module.lora_A:
                down = full_tensor(module.lora_A[STUDENT_ADAPTER].weight.detach()).float()
                up = full_tensor(module.lora_B[STUDENT_ADAPTER].weight.detach()).float()
                tensor = (tensor.float() + module.scaling[STUDENT_ADAPTER] * (up @ down)).to(tensor.dtype)
            name = f"{prefix}.{leaf}"
        yield name, tensor
