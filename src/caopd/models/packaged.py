"""The models the package ships, by the names a user types (torch-free: tracking resolves these names too)."""

from __future__ import annotations

from pathlib import Path

_HERE = Path(__file__).parent

# name -> checkpoint folder: the tiny default (character-level, no chat template) and the stand-in instruct model
# (Qwen3's tokenizer conventions, chat template and thinking).
PACKAGED_MODELS: dict[str, Path] = {
    "tiny": _HERE / "tiny_checkpoint", "caopd-tiny": _HERE / "tiny_checkpoint",
    "standin": _HERE / "standin_checkpoint", "caopd-standin": _HERE / "standin_checkpoint",
}
