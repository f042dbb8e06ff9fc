"""fedprompt: private, personalized federated prompt learning on frozen multimodal models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fedprompt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
