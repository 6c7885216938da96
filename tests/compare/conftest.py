"""The tiny model and data of tests/train, for `petune compare`."""

from tests.train.tiny import tiny_data, tiny_model_dir, tokenizer

__all__ = ["tiny_data", "tiny_model_dir", "tokenizer"]
