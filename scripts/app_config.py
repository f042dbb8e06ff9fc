"""Print the ``[tool.flwr.app.config]`` table for pyproject.toml from RunConfig's defaults
(the one source of defaults; tests/test_config.py checks pyproject.toml holds exactly it).

    python scripts/app_config.py
"""

from __future__ import annotations

import tomli_w

from fedprompt.config import flower_app_config

if __name__ == "__main__":
    print(tomli_w.dumps({"tool": {"flwr": {"app": {"config": flower_app_config()}}}}), end="")
