"""The training loop shared by the experiments: config, presets, optimizer, devices,
checkpoints, metrics, hooks and the command line of ``python -m experiments.train``."""
