"""Training: data, optimizer, loop, distributed, checkpoints."""
