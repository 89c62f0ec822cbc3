"""Text towers and tokenizers."""

from vlkit.text.tokenizer import TokenBatch, Tokenizer, train_tokenizer
from vlkit.text.transformer import TextConfig, TextTransformer

__all__ = ["TextConfig", "TextTransformer", "TokenBatch", "Tokenizer", "train_tokenizer"]
