"""Evaluation: few-shot tasks and protocol (tasks.py, fewshot.py), scorers (metrics.py),
generation with a cache (generate.py), held-out attribute accuracy (attributes.py)."""
