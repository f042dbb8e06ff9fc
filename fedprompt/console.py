"""Shared rich console and progress bars (the look of Flower's own CLI)."""

from __future__ import annotations

import logging

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def show_fedprompt_logs(level: int = logging.INFO) -> None:
    """Print fedprompt's own log records (round summaries, rejected updates, declined
    clients) on the shared console; for command-line entry points."""
    logger = logging.getLogger("fedprompt")
    if not any(isinstance(h, RichHandler) for h in logger.handlers):
        logger.addHandler(RichHandler(console=console, show_path=False, markup=False))
    logger.setLevel(level)
    logger.propagate = False


def make_progress(enabled: bool = True) -> Progress:
    """A progress display; ``enabled=False`` keeps it silent (tests, library use)."""
    return Progress(
        TextColumn("[bold blue]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=False,
    )
