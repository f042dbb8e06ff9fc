"""Training a prompt the way a federated client trains it, on a chosen training set.

The audit needs prompts trained exactly like the audited client's (same learner, same
local DP mechanism, same rounds and local epochs) on other training sets: the target with
canaries inserted, and shadow models on random halves of the client's records. It runs
the client's own code (:class:`~fedprompt.federated.client.ClientSession`, every round
of it) in a one-client federation: each round the server's shared tensors are the
client's own last trained ones (FedAvg of one client, no server noise), so the released
prompt is everything the client trained, the strongest thing a record-level attacker of
that client can observe. The record-level epsilon of the run is the client's accountant
after the last round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor

from fedprompt.config import RunConfig
from fedprompt.federated.client import ClientSession
from fedprompt.privacy.accounting import Accountant

#: client ids (which key the DP random streams) of the audit's own trainings start here, so
#: that no shadow shares a noise or sampling stream with a real client or another shadow
STREAM_BASE = 1_000_000


@dataclass
class TrainedPrompt:
    """A prompt trained like the client's: its released context and its guarantee."""

    context: Tensor
    epsilon: float | None  # record-level, the client's accountant; None without local DP
    dp_steps: int  # noisy steps the accountant composed (0 without local DP)
    rounds: int
    examples: int


def client_session(config: RunConfig, client: int, stream: int | None = None
                   ) -> ClientSession:
    """Client ``client``'s session (its partition of the configured data); ``stream``
    keys its random streams (default: the client's own)."""
    return ClientSession(config, client, config.data.num_clients, client_id=stream)


def train_like_client(config: RunConfig, client: int, features: Tensor,
                      labels: np.ndarray, stream: int) -> TrainedPrompt:
    """Train client ``client``'s learner on ``(features, labels)`` for
    ``federation.rounds`` rounds of its local step (DP as configured), with its random
    streams keyed by ``stream``."""
    session = client_session(config, client, stream)
    session.use_training_set(features, labels)
    shared = {k: v.clone() for k, v in session.initial_shared.items()}
    state = None
    rounds = 0
    for server_round in range(1, config.federation.rounds + 1):
        outcome = session.train(shared, state, server_round)
        if outcome.declined_reason:
            break
        state = outcome.state
        rounds = server_round
        shared = {k: shared[k] + outcome.update[k] for k in shared}
    epsilon = 0.0 if session.local_dp else None
    dp_steps = 0
    if session.local_dp and state is not None and state.accountant:
        accountant = Accountant.from_json(state.accountant)
        dp_steps = accountant.steps
        epsilon = accountant.epsilon(config.privacy.delta)
    return TrainedPrompt(session.context(shared, state), epsilon, dp_steps, rounds,
                         len(labels))
