"""The synthetic world's demonstration: tiny pretrained backbones (backbones.py) and the learning
report of a run (report.py)."""
