"""Training beyond one pod: a TrainJob (Kubeflow Trainer) or PyTorchJob (Training Operator v1) that runs the
training stage under torchrun on several nodes, launched and watched from the pipeline's training step."""
