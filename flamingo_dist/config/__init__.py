"""The job config: typed fields (schema.py), loading and validation (load.py), flavors
(flavors.py), the DeepSpeed JSON resolved from it (deepspeed.py) and the generated reference
docs/config.md (docs.py). Imports nothing heavy, so a bad config fails in a second."""
