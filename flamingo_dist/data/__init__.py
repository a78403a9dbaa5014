"""Data: shard reading and the four formats (formats.py), decoding and packing (processing.py),
IDEFICS' token layout (layout.py), the resumable streams (pipeline.py), the trainer's feed of
micro-batches (feed.py), shard building and checking (shards.py), the synthetic corpus
(synthetic.py)."""
