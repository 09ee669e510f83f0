"""Training and evaluation over cached features: data, train loop, metrics, calibration, checkpoints, plots."""
