"""Process groups (groups.py: Megatron's parallel state, DeepSpeed's mpu adapter) and SLURM
(slurm.py: environment, stop signal, requeue)."""
