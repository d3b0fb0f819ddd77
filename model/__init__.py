"""Localist models: the attention with its dial, blocks, metrics, theory, and the model classes."""
