"""Flower ClientApp for fedprompt (the glue between Flower messages and
:mod:`fedprompt.federated`)."""
