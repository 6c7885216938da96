"""The tiny-model fixtures of `tests/train/tiny.py`, for the TRL and example tests."""

from tests.train.tiny import tiny_model_dir, tokenizer

__all__ = ["tiny_model_dir", "tokenizer"]
