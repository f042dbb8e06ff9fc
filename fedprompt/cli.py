"""``fedprompt`` command line.

    fedprompt train [--config run.toml] [--set key=value ...] [--output DIR] [--quiet]
    fedprompt config [--config run.toml] [--set key=value ...]   # print the resolved config
    fedprompt config --keys                                      # list every config key
    fedprompt audit RUN_DIR [--set audit.key=value ...]          # audit a federated run
    fedprompt audit --config run.toml [--set key=value ...]      # train what it needs
"""

from __future__ import annotations

import argparse
import os
import sys

from fedprompt.errors import FedPromptError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedprompt", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def config_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", "-c", help="TOML file (sections [backbone] [prompt] [data] "
                       "[train])")
        p.add_argument("--set", "-s", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE", help="override a key, e.g. --set train.lr=0.01")

    train = sub.add_parser("train", help="one-site prompt learning; writes a results folder")
    config_args(train)
    train.add_argument("--output", "-o", help="parent folder of the results folder "
                       "(default: the config's output_dir)")
    train.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    audit = sub.add_parser(
        "audit", help="empirical privacy audit of one client: membership attacks on its "
        "released prompt and the one-run epsilon lower bound (docs/audit.md)")
    audit.add_argument("run_dir", nargs="?", help="results folder of a federated run (its "
                       "config.toml and client state); omit it and give --config to train "
                       "what the audit needs")
    config_args(audit)
    audit.add_argument("--output", "-o", help="without RUN_DIR: parent folder of the new "
                       "results folder (default: the config's output_dir)")
    audit.add_argument("--quiet", "-q", action="store_true", help="no progress bars")

    show = sub.add_parser("config", help="print the resolved configuration as TOML")
    config_args(show)
    show.add_argument("--keys", action="store_true", help="list every key with its meaning")
    return parser


def _print_keys() -> None:
    from fedprompt.config import RunConfig

    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if hasattr(model, "model_fields"):
            for name, sub in model.model_fields.items():
                print(f"{section}.{name} = {sub.default!r}  # {sub.description or ''}")
        else:
            print(f"{section} = {field.default!r}  # {field.description or ''}")


def _train(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedprompt.config import load_config
    from fedprompt.console import console
    from fedprompt.training.run import run_local

    config = load_config(args.config, args.overrides)
    result = run_local(config, progress=not args.quiet, output_dir=args.output)
    m = result.metrics
    table = Table(title=f"{config.name}: {config.prompt.learner} on {config.data.dataset} "
                  f"({m['data']['num_classes']} classes, backbone {config.backbone.model})")
    table.add_column("")
    table.add_column("test accuracy", justify="right")
    table.add_column("test loss", justify="right")
    table.add_row("before training", f"{m['before']['test_accuracy']:.4f}",
                  f"{m['before']['test_loss']:.4f}")
    table.add_row(f"after {config.train.epochs} epochs", f"{m['final']['test_accuracy']:.4f}",
                  f"{m['final']['test_loss']:.4f}")
    table.add_row("chance", f"{1 / m['data']['num_classes']:.4f}", "")
    console.print(table)
    console.print(f"run took {m['run']['seconds']:.1f} s; results in [bold]{result.output_dir}")
    print(result.output_dir)
    return 0


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _audit(args: argparse.Namespace) -> int:
    from rich.table import Table

    from fedprompt.audit.run import audit_config, run_audit
    from fedprompt.console import console

    config = audit_config(args.run_dir, args.config, args.overrides)
    result = run_audit(config, args.run_dir, output_dir=args.output, progress=not args.quiet)
    report = result.report
    run = report["run"]
    heading = (f"{run['method']} client {run['client']} ({run['client_examples']} records), "
               f"privacy {run['privacy_mode']}: record-level audit")
    if "membership" in report:
        member = report["membership"]
        table = Table(title=f"membership inference, {heading}")
        for column in ("attack", "AUC", "balanced acc", "TPR @ 1% FPR", "TPR @ 0.1% FPR"):
            table.add_column(column, justify="left" if column == "attack" else "right")
        for name, row in member["attacks"].items():
            table.add_row(name, _fmt(row["auc"]), _fmt(row["accuracy"]),
                          _fmt(row["tpr_at_1pct_fpr"]), _fmt(row["tpr_at_01pct_fpr"]))
        console.print(table)
        console.print(f"target: {member['target']}; its record-level epsilon "
                      f"{_fmt(member['target_epsilon'], 2)}; {member['shadows']} shadows")
    if "one_run" in report:
        one = report["one_run"]
        best = one["best"]
        console.print(
            f"one-run audit: {one['inserted']} of {one['canaries']} {one['canary_kind']} "
            f"canaries inserted; best guesses ({best['score']}, {best['guesses']} guesses) "
            f"{best['correct']} right; empirical epsilon lower bound "
            f"[bold]{one['epsilon_lower_bound']:.3f}[/bold] at {one['confidence']:.0%} "
            f"confidence vs accountant epsilon [bold]{_fmt(one['accountant_epsilon'])}"
            f"[/bold] (delta {one['delta']:g})")
        console.print(one["verdict"])
    console.print(f"audit took {run['seconds']:.1f} s; audit.json and plots in "
                  f"[bold]{result.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = _parser().parse_args(argv)
    if getattr(args, "quiet", False) or args.command in ("train", "audit"):
        # our own rich bars show progress; transformers' tqdm bars would interleave
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "train":
            return _train(args)
        if args.command == "audit":
            return _audit(args)
        if args.keys:
            _print_keys()
            return 0
        from fedprompt.config import load_config

        print(load_config(args.config, args.overrides).to_toml(), end="")
        return 0
    except FedPromptError as exc:
        print(f"fedprompt: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
