"""Minion-protocol bridge: secure channel, attestation, enclave server and secure client.

Submodules are imported explicitly (``fedprompt.minion.channel`` etc.) so that the
crypto core does not pull in FastAPI or model code.
"""
