"""Metrics (stdout line, metrics.jsonl, TensorBoard, wandb), phase timers, progress bars, reward plots."""
