"""The exceptions fedprompt raises. Each message says what was wrong and how to fix it."""


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
