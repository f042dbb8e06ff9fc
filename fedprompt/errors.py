"""The exceptions fedprompt raises. Each message says what was wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class FedPromptError(Exception):
    """Base class of every error fedprompt raises on purpose."""


class ConfigError(FedPromptError, ValueError):
    """A configuration value or key is invalid."""


class DataError(FedPromptError, ValueError):
    """A data set, image, or split is unusable."""


class BackboneError(FedPromptError, ValueError):
    """A backbone cannot be built or loaded, or does not fit the prompt it is given."""


class PromptError(FedPromptError, ValueError):
    """A prompt learner's settings or tensors are invalid."""


class DependencyError(FedPromptError, ImportError):
    """An optional dependency is missing or unusable."""


class RunError(FedPromptError, RuntimeError):
    """A federated run cannot start or cannot go on (no client connected, a round in which
    no client succeeded)."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a federated run: the last round it completed and its results
    folder (``None`` before one was created). A :class:`KeyboardInterrupt`, so code that
    does not know it still sees an interrupt."""

    def __init__(self, rounds_done: int, output_dir: Path | None) -> None:
        super().__init__(rounds_done, output_dir)
        self.rounds_done = rounds_done
        self.output_dir = output_dir

    def __str__(self) -> str:
        where = (f"after round {self.rounds_done}" if self.rounds_done
                 else "before round 1 completed")
        if self.output_dir is None:
            return f"interrupted {where}; nothing was written"
        return f"interrupted {where}; results so far in {self.output_dir}"
