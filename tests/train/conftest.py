"""The tiny-model fixtures of `tiny.py`, for every test under tests/train."""

from tests.train.tiny import tiny_data, tiny_model_dir, tokenizer

__all__ = ["tiny_data", "tiny_model_dir", "tokenizer"]
