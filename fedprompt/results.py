"""Results folders: resolved config, metrics, privacy ledger and plots of a run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fedprompt.atomic import atomic_write_text
from fedprompt.config import RunConfig


def create_run_dir(config: RunConfig, output_dir: str | Path | None = None) -> Path:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (suffixed if it already exists), with the
    resolved config written first so that even a failed run says what it was."""
    parent = Path(output_dir or config.output_dir).expanduser()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = parent / f"{config.name}-{stamp}"
    suffix = 1
    while path.exists():
        suffix += 1
        path = parent / f"{config.name}-{stamp}-{suffix}"
    path.mkdir(parents=True)
    write_config(config, path)
    return path


def write_config(config: RunConfig, folder: Path) -> None:
    """``folder/config.toml``: the resolved configuration (seed included), atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / "config.toml", f"# resolved configuration of this run (seed "
                      f"{config.seed})\n" + config.to_toml())


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as JSON (non-finite floats as null), atomically."""
    atomic_write_text(path, json.dumps(_json_safe(data), indent=2, sort_keys=False) + "\n")


def plot_epoch_accuracy(metrics: dict[str, Any], path: Path) -> None:
    """Accuracy per epoch (train, test, neighbor test), epoch 0 = before training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = [0] + [e["epoch"] for e in metrics["epochs"]]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = [("test_accuracy", "test"), ("neighbor_accuracy", "neighbor test"),
              ("train_accuracy", "train (running)")]
    for key, label in series:
        before = metrics["before"].get(key)
        values = [before] + [e.get(key) for e in metrics["epochs"]]
        if all(v is None for v in values[1:]):
            continue
        points = [(x, y) for x, y in zip(epochs, values, strict=True) if y is not None]
        ax.plot(*zip(*points, strict=True), marker="o", label=label)
    chance = 1.0 / metrics["data"]["num_classes"]
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch (0 = before training)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_title(f"{metrics['run']['name']}: {metrics['run']['learner']} on "
                 f"{metrics['data']['dataset']}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
