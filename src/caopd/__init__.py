"""caopd: Calibration-Aware On-Policy Distillation."""

__version__ = "0.1.0"
