"""Training: model assembly from config and weights (build.py), the DeepSpeed engine and
optimizer (engine.py, optim.py), the Trainer (trainer.py), committed checkpoints
(checkpoint.py), tracking (tracking.py), and the start-up checks of the inputs (inputs.py)."""
