"""``fedprompt audit``: audit a trained run's client, or train what the audit needs.

Writes into the run's results folder (or a new one):

* ``audit.json``: see :data:`AUDIT_KEYS`;
* ``audit_roc.png``: ROC curves of the membership attacks (log-log, as LiRA plots them);
* ``audit_canaries.png``: the one-run audit's canary scores, inserted vs not.

Every figure is labelled with the privacy level it concerns: the audit attacks one
client's records, so it measures **record-level** DP (the client's local DP-SGD). A run
without local DP claims no record-level epsilon; its audit shows what an attacker gets.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

import fedprompt
from fedprompt.audit.membership import MembershipAudit, run_membership
from fedprompt.audit.one_run import OneRunAudit, run_one_run
from fedprompt.audit.training import client_session, train_like_client
from fedprompt.config import RunConfig, load_config
from fedprompt.console import make_progress
from fedprompt.errors import ConfigError
from fedprompt.federated.client_store import EXPORT_DIR, LEDGER_FILE, SIMULATION_SUBDIR
from fedprompt.federated.generative import is_generative
from fedprompt.privacy.ledger import PrivacyLedger
from fedprompt.prompts.portable import load_prompt
from fedprompt.results import create_run_dir, write_json
from fedprompt.seeding import seed_everything

SCHEMA = "fedprompt.audit/1"
AUDIT_KEYS = {
    "schema": SCHEMA,
    "run": "the audited run: name, method, data set, privacy mode, client, seconds",
    "privacy_level": "record-level (the audit attacks one client's records)",
    "membership": "target (where its prompt came from), target_epsilon, shadows, "
                  "shadow_epsilon, attacks: per attack auc, accuracy (best balanced), "
                  "tpr_at_1pct_fpr, tpr_at_01pct_fpr, members, non_members",
    "one_run": "canaries, inserted, canary_kind, delta, confidence, accountant_epsilon (of "
               "the canaried training), nominal_epsilon (nominal mode), epsilon_lower_bound, "
               "best guess (score, fraction, guesses, correct), every choice, separation "
               "(AUC of each canary score), verdict",
}


@dataclass
class AuditResult:
    output_dir: Path
    report: dict[str, Any]


def find_client_folder(run_dir: Path, client: int) -> Path:
    """``<run>/client-state/run-<id>/client-<client>`` of an in-process or Ray run."""
    matches = sorted((run_dir / SIMULATION_SUBDIR).glob(f"run-*/client-{client}"))
    if not matches:
        raise ConfigError(
            f"{run_dir} has no state of client {client} (looked for "
            f"{SIMULATION_SUBDIR}/run-*/client-{client}): audit a federated run's results "
            "folder and a client that trained in it (audit.client), or give --config to "
            "train what the audit needs")
    if len(matches) > 1:
        raise ConfigError(f"{run_dir} holds client {client}'s state of several runs "
                          f"({', '.join(str(m.parent.name) for m in matches)}): audit one")
    return matches[0]


def _target_from_run(run_dir: Path, config: RunConfig, backbone: Any
                     ) -> tuple[Tensor, str, float | None]:
    folder = find_client_folder(run_dir, config.audit.client)
    export = folder / EXPORT_DIR
    prompt = load_prompt(export, backbone)
    ledger_file = folder / LEDGER_FILE
    epsilon = (PrivacyLedger.from_json(ledger_file.read_text()).epsilon
               if ledger_file.is_file() else None)
    return prompt.context, f"the client's exported prompt ({export})", epsilon


def verdict(bound: float, epsilon: float | None, mode: str, nominal: float | None) -> str:
    """What the one-run bound says about the claimed guarantee."""
    if mode == "nominal":
        claim = f"nominal epsilon {nominal:g} (DP-FPL's recipe, not a guarantee)"
        if nominal is not None and bound > nominal:
            return (f"the nominal claim is violated: empirical lower bound {bound:.3f} > "
                    f"{claim}")
        return f"no violation found of the {claim}; it is still no valid guarantee"
    if epsilon is None:
        return ("no record-level DP claimed; the bound shows how much an attacker learns "
                "about a record")
    if bound > epsilon:
        return (f"VIOLATION: the empirical lower bound {bound:.3f} exceeds the accountant's "
                f"epsilon {epsilon:.3f}: the guarantee does not hold (a bug)")
    return (f"consistent: the empirical lower bound {bound:.3f} does not exceed the "
            f"accountant's epsilon {epsilon:.3f}")


def _membership_report(result: MembershipAudit, target: str,
                       target_epsilon: float | None) -> dict[str, Any]:
    return {
        "target": target, "target_epsilon": target_epsilon,
        "shadows": result.shadows, "shadow_epsilon": result.shadow_epsilon,
        "attacks": {a.name: a.summary.as_dict() for a in result.attacks},
    }


def _one_run_report(result: OneRunAudit, config: RunConfig) -> dict[str, Any]:
    privacy = config.privacy
    nominal = privacy.epsilon if privacy.mode == "nominal" else None
    bound = result.best.epsilon_lower_bound
    return {
        "canaries": result.canaries, "inserted": result.inserted,
        "canary_kind": config.audit.canary_kind, "delta": privacy.delta,
        "confidence": config.audit.confidence,
        "accountant_epsilon": result.trained.epsilon, "nominal_epsilon": nominal,
        "dp_steps": result.trained.dp_steps, "rounds": result.trained.rounds,
        "training_examples": result.trained.examples,
        "epsilon_lower_bound": bound, "best": asdict(result.best),
        "choices": [asdict(c) for c in result.choices],
        "separation": {k: v.as_dict() for k, v in result.separation.items()},
        "verdict": verdict(bound, result.trained.epsilon, privacy.mode, nominal),
    }


def plot_roc(result: MembershipAudit, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    floor = 1.0 / max(1, result.attacks[0].summary.non_members)
    for attack in result.attacks:
        ax.plot(np.maximum(attack.fpr, floor), np.maximum(attack.tpr, floor),
                label=f"{attack.name} (AUC {attack.summary.auc:.2f})")
    ax.plot([floor, 1], [floor, 1], "k--", linewidth=0.8, label="chance")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_canaries(result: OneRunAudit, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(result.scores), figsize=(5 * len(result.scores), 3.6),
                             dpi=120)
    for ax, (name, values) in zip(np.atleast_1d(axes), result.scores.items(), strict=True):
        bins = np.histogram_bin_edges(values, bins=30)
        ax.hist(values[result.included], bins=bins, alpha=0.6, label="inserted")
        ax.hist(values[~result.included], bins=bins, alpha=0.6, label="not inserted")
        ax.set_xlabel(f"{name} score")
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run_audit(config: RunConfig, run_dir: str | Path | None = None,
              output_dir: str | Path | None = None, progress: bool = True) -> AuditResult:
    """Audit client ``audit.client`` of ``run_dir`` (a federated run's results folder; its
    exported prompt is the membership target), or, without ``run_dir``, of a run trained
    here from ``config``. The one-run audit always trains its own canaried copy of the
    client. Results go into ``run_dir`` (or a new folder under ``output_dir``)."""
    started = time.time()
    audit = config.audit
    if not (audit.membership or audit.one_run):
        raise ConfigError("audit.membership and audit.one_run are both false: nothing to do")
    if is_generative(config):
        raise ConfigError(
            f"fedprompt audit attacks prompts of dual-encoder classifiers (CLIP, "
            f"effnet-minilm); {config.backbone.model!r} is a generative (LLaVA) backbone, "
            "whose outputs the attacks here do not score yet")
    if audit.client >= config.data.num_clients:
        raise ConfigError(f"audit.client = {audit.client} but the run has "
                          f"{config.data.num_clients} clients (0..{config.data.num_clients - 1})")
    seed_everything(config.seed)
    out = Path(run_dir) if run_dir is not None else create_run_dir(
        config.model_copy(update={"name": f"{config.name}-audit"}), output_dir)
    session = client_session(config, audit.client)
    initial = session.context(session.initial_shared, None)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "run": {"name": config.name, "method": config.federation.method,
                "dataset": config.data.dataset, "privacy_mode": config.privacy.mode,
                "local_dp": config.privacy.mode != "off" and config.privacy.local,
                "client": audit.client, "client_examples": session.num_examples,
                "fedprompt": fedprompt.__version__,
                "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started))},
        "privacy_level": "record-level (one client's records; the client's local DP)",
    }
    title = (f"{config.federation.method}, client {audit.client}, privacy "
             f"{config.privacy.mode}")
    with make_progress(progress) as bar:
        if audit.membership:
            task = bar.add_task("membership: shadows", total=audit.shadows + 1, info="")
            if run_dir is not None:
                target, source, target_eps = _target_from_run(Path(run_dir), config,
                                                              session.backbone)
            else:
                trained = train_like_client(config, audit.client, session.train_features,
                                            np.asarray(session.train_labels),
                                            stream=audit.client)
                target, target_eps = trained.context, trained.epsilon
                source = "trained by the audit like the client (one-client federation)"
            bar.update(task, advance=1, info="target ready")
            membership = run_membership(config, session, target, initial,
                                        on_shadow=lambda s: bar.update(task, advance=1))
            report["membership"] = _membership_report(membership, source, target_eps)
            plot_roc(membership, out / "audit_roc.png", title)
        if audit.one_run:
            task = bar.add_task("one-run audit", total=1, info=f"{audit.canaries} canaries")
            one_run = run_one_run(config, session, initial)
            bar.update(task, advance=1)
            report["one_run"] = _one_run_report(one_run, config)
            claimed = report["one_run"]["accountant_epsilon"]
            plot_canaries(one_run, out / "audit_canaries.png",
                          f"{title}: empirical epsilon >= "
                          f"{report['one_run']['epsilon_lower_bound']:.2f} "
                          f"({audit.confidence:.0%}) vs accountant "
                          + ("none" if claimed is None else f"{claimed:.2f}"))
    report["run"]["seconds"] = time.time() - started
    write_json(out / "audit.json", report)
    return AuditResult(out, report)


def audit_config(run_dir: str | Path | None, config_path: str | None,
                 overrides: list[str]) -> RunConfig:
    """The configuration to audit: a run folder's ``config.toml`` (or ``config_path``),
    then ``--set`` overrides (e.g. ``audit.shadows=16``)."""
    if run_dir is not None:
        folder = Path(run_dir)
        if not (folder / "config.toml").is_file():
            raise ConfigError(f"{folder} is not a results folder (no config.toml): give the "
                              "folder a federated run wrote")
        if config_path is not None:
            raise ConfigError("give either a run folder or --config, not both")
        return load_config(folder / "config.toml", overrides)
    return load_config(config_path, overrides)
