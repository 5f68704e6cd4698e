"""Training: configuration, losses, the trainer and checkpoints."""
