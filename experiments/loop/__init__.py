"""The training loop every task shares: one config, the presets, optimizer, devices,
checkpoints, metrics, evaluation, hooks, the task interface and the command line
of ``python -m experiments.train``."""
