"""The local step (train/evaluate a prompt learner) and the one-site experiment."""

from fedprompt.training.model import PromptedClassifier
from fedprompt.training.trainer import EpochStats, EvalStats, LocalTrainer, warmup_cosine

__all__ = ["EpochStats", "EvalStats", "LocalTrainer", "PromptedClassifier", "warmup_cosine"]
