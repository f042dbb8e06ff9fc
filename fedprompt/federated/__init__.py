"""Federated prompt learning without Flower: methods, the client's round, the server's
aggregation with global DP, and the run history. ``clients/`` and ``strategies/`` wrap
these in Flower's ClientApp and ServerApp."""

from fedprompt.federated.client import ClientSession, ClientState, TrainOutcome
from fedprompt.federated.methods import METHODS, MethodSpec, build_method_learner
from fedprompt.federated.server import ClientReply, FederatedServer

__all__ = [
    "METHODS",
    "ClientReply",
    "ClientSession",
    "ClientState",
    "FederatedServer",
    "MethodSpec",
    "TrainOutcome",
    "build_method_learner",
]
