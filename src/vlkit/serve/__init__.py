"""Talking to trained models: ``chat`` (one-shot or interactive, tokens streamed as they are generated)."""
