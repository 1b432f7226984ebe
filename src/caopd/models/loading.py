"""Load any causal LM — the packaged tiny model, a local checkpoint folder or a hub id — one code path."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.utils import logging as hf_logging

from caopd.config.memory import SAFETENSORS_INDEX, safetensors_files, safetensors_header_parameters
from caopd.errors import CaopdInputError
from caopd.models.attention import use_cpu_attention
from caopd.models.packaged import PACKAGED_MODELS

METADATA_FILE = "caopd.json"  # written beside checkpoints this project makes (template, provenance)
# Running the Python a checkpoint ships is the user's explicit choice, for checkpoints they trust.
TRUST_REMOTE_CODE_ENV = "CAOPD_TRUST_REMOTE_CODE"
# Where load_model puts the weights: on the device (ready to run), on the CPU (rank 0 under FSDP, to be sharded), or
# nowhere (the meta device: the other processes under FSDP, to be filled from rank 0).
WeightPlacement = Literal["device", "cpu", "meta"]


def remote_code_allowed() -> bool:
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    template: str  # teacher-context template family: "paper" or "compact"
    source: str


@dataclass
class LoadedTokenizer:
    """A model's tokenizer and config without its weights: what a stage needs when vLLM runs the model."""

    tokenizer: Any
    config: PretrainedConfig
    template: str
    source: str
    path: str  # what vLLM loads: the resolved folder or hub id


def resolve_model_path(name_or_path: str) -> str:
    """The packaged tiny or stand-in checkpoint for their aliases; otherwise the local folder or hub id unchanged."""
    if name_or_path in PACKAGED_MODELS:
        return str(PACKAGED_MODELS[name_or_path])
    return name_or_path


def model_template(path: str) -> str:
    meta = Path(path) / METADATA_FILE
    if meta.is_file():
        return json.loads(meta.read_text()).get("template", "paper")
    return "paper"


def looks_like_local_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that is missing on disk is a mistyped folder."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_checkpoint_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise CaopdInputError("checkpoint folder has no config.json", file=str(path), field="config.json")
    if not any(path.glob("*.safetensors")) and not (path / SAFETENSORS_INDEX).is_file():
        raise CaopdInputError("checkpoint folder has no .safetensors weights (pickle weights are not loaded)",
                              file=str(path), field="model.safetensors")


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (loading, writing shards) on or off for the block, restored afterwards."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was_enabled else hf_logging.disable_progress_bar)()


def default_device() -> str:
    """This process's GPU when there is one (under torchrun, the one of its LOCAL_RANK), else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def checked_model_path(name_or_path: str) -> str:
    """The folder or hub id a model source resolves to (``resolve_model_path``), a local folder checked for a config
    and safetensors weights: the one resolution every loader shares."""
    path = resolve_model_path(name_or_path)
    if Path(path).exists():
        check_checkpoint_folder(Path(path))
    elif looks_like_local_path(path):
        raise CaopdInputError("checkpoint folder does not exist", file=path)
    return path


@contextmanager
def _loading_errors(path: str) -> Iterator[None]:
    """transformers' loading errors as the user's: a missing or unreadable checkpoint, remote code refused."""
    try:
        yield
    except OSError as err:
        raise CaopdInputError(f"cannot load model: {str(err).splitlines()[0]}", file=path) from None
    except ValueError as err:
        if "trust_remote_code" not in str(err):
            raise
        raise CaopdInputError(f"the checkpoint ships Python code to run, which is refused; set "
                              f"{TRUST_REMOTE_CODE_ENV}=1 only for a checkpoint you trust", file=path,
                              field="auto_map") from None


def _tokenizer(path: str, trust_remote_code: bool) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def to_device(model: PreTrainedModel, device: str) -> PreTrainedModel:
    """The one place a loaded model's weights go onto a device (tests account what lands on a GPU here)."""
    return model.to(device)


def load_model(name_or_path: str, *, dtype: torch.dtype = torch.float32, device: str | None = None,
               trust_remote_code: bool | None = None, progress: bool = False,
               weights: WeightPlacement = "device") -> LoadedModel:
    """Load a model and its tokenizer with safetensors weights only and remote code off unless the user opts in
    (``trust_remote_code=True``, or $CAOPD_TRUST_REMOTE_CODE=1 when left at None).

    ``progress`` shows transformers' weight-loading bar (worth it for multi-GB hub models, noise otherwise).
    ``weights``: where the weights go — "device": onto ``device``, ready to run; "cpu": read into the CPU's memory
    for FSDP to shard onto ``device`` (rank 0 under FSDP); "meta": not read at all, the model built from its config
    on the meta device for FSDP to shard and fill from rank 0 (the other processes: no process but rank 0 holds a
    whole copy). ``device`` is where the model runs in every case (its attention kernel is chosen for it).
    """
    if trust_remote_code is None:
        trust_remote_code = remote_code_allowed()
    path = checked_model_path(name_or_path)
    device = device or default_device()
    with _loading_errors(path), hf_progress_bars(progress):
        tokenizer = _tokenizer(path, trust_remote_code)
        if weights == "meta":
            model = meta_model(path, dtype, trust_remote_code)
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True,
                                                         trust_remote_code=trust_remote_code)
    if weights == "device":
        to_device(model, device)
    model.eval()
    if torch.device(device).type == "cpu":
        use_cpu_attention(model)  # a no-op on GPUs and on the meta device (FSDP's materialisation does it there)
    return LoadedModel(model, tokenizer, model_template(path), source=name_or_path)


def meta_model(path: str, dtype: torch.dtype, trust_remote_code: bool) -> PreTrainedModel:
    """The checkpoint's architecture on the meta device, from its config alone (no weight file opened), with the
    generation config ``from_pretrained`` would read (its stop tokens decide where sampling ends)."""
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    try:
        model.generation_config = GenerationConfig.from_pretrained(path)
    except OSError:  # none in the checkpoint: from_pretrained also keeps the one derived from the config
        pass
    return model


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Copy a checkpoint folder's safetensors weights into ``model`` (one shard file at a time), by state-dict name.
    A tied weight (embeddings and head) is stored once, under either of its names; any other tensor missing or
    left over is an error naming the folder."""
    expected = model.state_dict()
    seen: set[str] = set()
    for file in safetensors_files(folder):
        if not file.is_file():
            raise CaopdInputError("weight file missing", file=str(file), field=file.name)
        shard = load_file(str(file))
        unexpected = sorted(set(shard) - set(expected))
        if unexpected:
            raise CaopdInputError(f"tensors the model does not have: {', '.join(unexpected[:3])}", file=str(file),
                                  field=unexpected[0])
        for name, tensor in shard.items():
            if tensor.shape != expected[name].shape:
                raise CaopdInputError(f"shape {list(tensor.shape)} where the model has {list(expected[name].shape)} "
                                      "(another architecture's checkpoint?)", file=str(file), field=name)
        model.load_state_dict(shard, strict=False)
        seen.update(shard)
    stored = {expected[name].data_ptr() for name in seen}
    missing = sorted(name for name, tensor in expected.items() if name not in seen and tensor.data_ptr() not in stored)
    if missing:
        raise CaopdInputError(f"{len(missing)} of the model's tensors are not in the checkpoint, e.g. {missing[0]}",
                              file=str(folder), field=missing[0])


def load_tokenizer_and_config(name_or_path: str, *, trust_remote_code: bool | None = None) -> LoadedTokenizer:
    """A model's tokenizer, config and template family, resolved and checked as ``load_model`` does, its weights
    left on disk (for vLLM to load): nothing lands on a GPU."""
    if trust_remote_code is None:
        trust_remote_code = remote_code_allowed()
    path = checked_model_path(name_or_path)
    with _loading_errors(path):
        tokenizer = _tokenizer(path, trust_remote_code)
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    return LoadedTokenizer(tokenizer, config, model_template(path), source=name_or_path, path=path)


def config_context_length(config: Any) -> int:
    """The context a model's config declares (``max_position_embeddings``; unbounded when it declares none)."""
    config = getattr(config, "text_config", None) or config
    return int(getattr(config, "max_position_embeddings", 0) or 1 << 30)


def safetensors_parameters(path: str) -> int | None:
    """The exact parameter count of a local checkpoint folder, from its safetensors headers (read, not loaded);
    None for a hub id or a folder without safetensors files. A sharded checkpoint counts the files its index names
    (some folders also hold a consolidated copy of the same weights)."""
    folder = Path(path)
    return safetensors_header_parameters(folder) if folder.is_dir() else None


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of a prompt text; rendered chat templates already carry their special tokens."""
    # verbose=False: a prompt longer than the context is reported by the caller as a counted skip.
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and getattr(tokenizer, "add_bos_token", False) and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids
