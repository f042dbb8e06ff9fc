"""Results folders: resolved config, metrics, privacy ledger and plots of a run."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from fedprompt.atomic import atomic_write_text
from fedprompt.config import RunConfig
from fedprompt.errors import ConfigError


def check_folder(path: str | Path, what: str = "output_dir") -> Path:
    """``path`` (expanded) if it is a folder or can be created as one: a
    :class:`~fedprompt.errors.ConfigError` naming the file in the way otherwise (checked
    before a run starts, so a bad ``output_dir`` costs no training)."""
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        where = "is a file" if existing == path else f"lies under {existing}, which is a file"
        raise ConfigError(f"{what} {path} {where}, not a folder: set {what} to a folder (it "
                          "is created if missing)")
    return path


def make_folder(path: Path, what: str = "output_dir") -> None:
    """Create ``path`` (and its parents) if missing, with a clear error if it cannot be."""
    check_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the results folder {path}: {exc.strerror or exc}; "
                          f"set {what} to a folder you can write to") from exc


def create_run_dir(config: RunConfig, output_dir: str | Path | None = None) -> Path:
    """``<output_dir>/<name>-<YYYYmmdd-HHMMSS>`` (suffixed if it already exists), with the
    resolved config written first so that even a failed run says what it was."""
    parent = check_folder(output_dir or config.output_dir)
    make_folder(parent)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = parent / f"{config.name}-{stamp}"
    suffix = 1
    while True:
        try:
            path.mkdir()  # exclusive: two runs started in the same second get two folders
            break
        except FileExistsError:
            suffix += 1
            path = parent / f"{config.name}-{stamp}-{suffix}"
        except OSError as exc:
            raise ConfigError(f"cannot create the results folder {path}: "
                              f"{exc.strerror or exc}; set output_dir to a folder you can "
                              "write to") from exc
    write_config(config, path)
    return path


def write_config(config: RunConfig, folder: Path) -> None:
    """``folder/config.toml``: the resolved configuration (seed included), atomically."""
    make_folder(folder)
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
