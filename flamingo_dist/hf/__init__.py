"""Hugging Face formats: LLaMA checkpoints (llama_config.py reads config.json without torch,
llama.py loads the weights sliced per tensor-parallel rank) and IDEFICS export and import."""
