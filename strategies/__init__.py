"""Flower ServerApp and strategy for fedprompt, and an in-process runner without Ray."""
