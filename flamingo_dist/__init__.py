"""flamingo_dist: Flamingo-style vision-language training on a tensor-parallel frozen LM."""

__version__ = "0.1.0"
