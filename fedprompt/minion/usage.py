"""Token accounting in the shape of minions' ``Usage`` (``minions/usage.py``).

Fields and behaviour match the published dataclass (``completion_tokens``,
``prompt_tokens``, ``cached_prompt_tokens``, ``seen_prompt_tokens``; ``new_prompt_tokens``,
``total_tokens``; field-wise ``+``; ``get``; ``to_dict``), so code written against the
original package reads ours unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from fedprompt.errors import FedPromptError


class UsageError(FedPromptError):
    """A client reported token usage in a shape we cannot read."""


@dataclass
class Usage:
    completion_tokens: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0
    seen_prompt_tokens: int = 0

    @property
    def new_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.seen_prompt_tokens

    @property
    def total_tokens(self) -> int:
        return self.completion_tokens + self.prompt_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, int]:
        out = asdict(self)
        out["new_prompt_tokens"] = self.new_prompt_tokens
        out["total_tokens"] = self.total_tokens
        return out

    @classmethod
    def coerce(cls, value: Any) -> Usage:
        """Read a ``Usage``, a minions ``Usage`` (duck-typed), a mapping, or ``None`` (zero)."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, Mapping):
            get = value.get
        elif hasattr(value, "prompt_tokens") and hasattr(value, "completion_tokens"):
            def get(key: str, default: Any = None) -> Any:
                return getattr(value, key, default)
        else:
            raise UsageError(f"cannot read token usage from a {type(value).__name__}")
        values: dict[str, int] = {}
        for f in fields(cls):
            raw = get(f.name, 0)
            raw = 0 if raw is None else raw
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                raise UsageError(f"usage field {f.name!r} must be a non-negative integer, "
                                 f"got {raw!r}")
            values[f.name] = raw
        return cls(**values)
