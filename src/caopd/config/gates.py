"""Promotion gates' settings: absolute thresholds and changes relative to the champion."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

GateMode = Literal["disabled", "dry-run", "enabled"]


class GateConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    mode: GateMode = Field("enabled", description="disabled: register only; dry-run: decide and record, move no "
                           "alias; enabled: decide, record, and set the alias when the gates pass")
    max_ece: float | None = Field(None, ge=0.0, le=1.0, description="absolute ECE ceiling (None = no ceiling)")
    max_brier: float | None = Field(None, ge=0.0, le=1.0, description="absolute Brier ceiling")
    min_accuracy: float | None = Field(None, ge=0.0, le=1.0, description="absolute accuracy floor")
    max_ece_increase: float = Field(0.0, ge=0.0, description="ECE may exceed the champion's by this fraction of it")
    max_brier_increase: float = Field(0.0, ge=0.0, description="Brier may exceed the champion's by this fraction")
    max_accuracy_drop: float = Field(0.02, ge=0.0, le=1.0, description="accuracy may fall below the champion's "
                                     "by this fraction of it")

