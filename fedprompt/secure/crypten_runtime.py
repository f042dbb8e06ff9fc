"""CrypTen settings for the compute-party and TTP processes (never the server's).

* ``mpc.provider = "TTP"``: Beaver tuples from the trusted third party process.
* ``communicator.verbose``: CrypTen counts rounds and bytes (``get_communication_stats``).
* A fast read-only view of CrypTen's configuration. CrypTen reads its OmegaConf config on
  every MPC operation (``cfg.debug.validation_mode``, ``cfg.mpc.provider``, ...); those
  lookups took more than half of the secure k-means' local compute. The view holds the
  same values in plain attributes; ``cfg.temp_override`` keeps working (it swaps in an
  overridden view for the duration of the ``with`` block).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import Any

from fedprompt.secure.crypten_compat import import_crypten


class _View:
    """Attribute view of a nested dict (what CrypTen's ``cfg.a.b`` lookups need)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self._data = data
        for key, value in data.items():
            setattr(self, key, _View(value) if isinstance(value, dict) else value)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def _apply(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value


def configure(verbose: bool = True) -> Any:
    """Set CrypTen up for this process (before ``crypten.init()``); returns crypten."""
    crypten = import_crypten()
    from omegaconf import DictConfig, OmegaConf

    cfg = crypten.cfg
    if isinstance(cfg.config, DictConfig):
        data = OmegaConf.to_container(cfg.config, resolve=True)
    else:
        data = copy.deepcopy(cfg.config._data)
    assert isinstance(data, dict)
    _apply(data, "mpc.provider", "TTP")
    _apply(data, "communicator.verbose", bool(verbose))
    cfg.set_config(_View(data))

    @contextlib.contextmanager
    def temp_override(override: dict[str, Any]) -> Iterator[None]:
        old = cfg.config
        new = copy.deepcopy(old._data)
        for key, value in override.items():
            _apply(new, key, value)
        cfg.set_config(_View(new))
        try:
            yield
        finally:
            cfg.set_config(old)

    object.__setattr__(cfg, "temp_override", temp_override)
    return crypten
