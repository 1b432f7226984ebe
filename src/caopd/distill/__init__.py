"""On-policy distillation: losses, teachers and the training loop."""
