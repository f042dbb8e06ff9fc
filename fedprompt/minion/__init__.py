"""Minion-protocol bridge: a trained prompt as the local worker of a local/remote chat
protocol, with an attested, end-to-end encrypted channel to a remote (enclave) model.

* ``channel``: X25519 key agreement, HKDF, ChaCha20-Poly1305 frames with counters and an
  authenticated end of stream;
* ``attestation``: evidence binding the channel key and a client nonce (NVIDIA GPU
  attestation SDK; an insecure mock that clients refuse without an explicit opt-in);
* ``enclave_server``: the reference FastAPI server (``fedprompt-enclave``);
  ``secure_client``: ``SecureChatClient`` (attests before sending anything);
* ``local_worker``: ``PromptedLocalClient`` (backbone + portable trained prompt, the Minion
  local-client interface, MinionS per-job semantics); ``perception``: CLIP facts from
  local images; ``usage``: a minions-compatible ``Usage``;
* ``protocol``: ``Minion`` with the published constructor and call signature;
  ``minions_runner``: ``MinionS`` (JSON job plans instead of executed supervisor code);
* ``compat``: ``SecureMinionsCompatClient`` for existing Secure Minions servers (their
  published wire protocol; warns once with that protocol's weaknesses);
* ``scripted``, ``loopback``: a rule-based supervisor and a loopback enclave for demos/tests.

Submodules are imported explicitly (``fedprompt.minion.channel`` etc.) so that the
crypto core does not pull in FastAPI or model code.
"""
