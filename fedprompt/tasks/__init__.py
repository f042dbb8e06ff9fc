"""Tasks for generative backbones (LLaVA): classification as generation and free-form
answers, with soft prompts in the language model's input."""

from fedprompt.tasks.config import TaskConfig

__all__ = ["TaskConfig"]
