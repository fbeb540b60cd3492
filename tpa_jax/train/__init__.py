"""Training: which variables train, the optimizer, losses, the jitted step, the trainer built
from a config, the loop with checkpoints and preemption, and metrics."""
