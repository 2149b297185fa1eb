"""Numerics: the FP8 fine-grained recipe and its backends."""
