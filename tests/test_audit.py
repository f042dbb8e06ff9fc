"""The empirical privacy audit: it detects a non-private run, a DP run's empirical lower
bound never exceeds its accountant epsilon, and it audits a federated run's exported
prompt with that client's ledger epsilon."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedprompt.audit.membership import lira_scores, mlp_scores
from fedprompt.audit.one_run import run_one_run
from fedprompt.audit.run import run_audit, verdict
from fedprompt.audit.training import client_session
from fedprompt.config import load_config

#: A client small enough to memorize (4 images per class, 5 classes) and a learner with
#: class-level prompts (SecFPP's), so that a record's pull on the prompt is visible even
#: with the random-weight tiny CLIP; canaries are crafted random features.
TINY = ["backbone.model='clip-tiny'", "prompt.n_ctx=4", "data.num_clients=2",
        "data.max_train_per_class=4", "federation.method='secfpp'", "federation.rounds=5",
        "federation.local_epochs=10", "train.batch_size=8", "train.optimizer='adamw'",
        "train.weight_decay=0.0", "train.lr=0.1", "privacy.server=false",
        "privacy.reproducible_noise=true", "audit.canaries=128"]


def _one_run(*overrides: str):
    config = load_config(overrides=[*TINY, *overrides])
    session = client_session(config, 0)
    return run_one_run(config, session, session.context(session.initial_shared, None))


def test_a_non_private_run_is_detected() -> None:
    result = _one_run()
    assert result.trained.epsilon is None
    assert 40 < result.inserted < 88  # each canary in with probability 1/2
    assert result.separation["loss"].auc > 0.85
    assert result.best.epsilon_lower_bound > 1.0  # 95% confidence, Bonferroni over 10 choices


@pytest.mark.parametrize("epsilon", [8.0, 2.0])
def test_a_dp_run_never_exceeds_its_accountant_epsilon(epsilon: float) -> None:
    result = _one_run("privacy.mode='target-epsilon'", f"privacy.epsilon={epsilon}")
    accountant = result.trained.epsilon
    assert accountant is not None and 0.9 * epsilon <= accountant <= epsilon * (1 + 1e-6)
    assert result.trained.dp_steps > 0
    assert result.best.epsilon_lower_bound <= accountant
    # the noise is what hides the canaries: far weaker separation than without DP
    assert result.separation["loss"].auc < 0.8
    assert verdict(result.best.epsilon_lower_bound, accountant, "target-epsilon",
                   None).startswith("consistent")


def test_verdict_flags_a_bound_above_the_claim() -> None:
    assert verdict(2.5, 1.0, "target-epsilon", None).startswith("VIOLATION")
    assert "nominal claim is violated" in verdict(0.9, 3.0, "nominal", 0.5)
    assert "no record-level DP" in verdict(3.0, None, "off", None)


def test_lira_and_mlp_separate_what_the_shadows_separate() -> None:
    rng = np.random.default_rng(0)
    shadows, records = 8, 200
    shadow_in = rng.random((shadows, records)) < 0.5
    shadow = rng.normal(0, 0.3, (shadows, records)) + 2.0 * shadow_in  # in: higher conf.
    member = rng.random(records) < 0.5
    target = rng.normal(0, 0.3, records) + 2.0 * member
    from fedprompt.audit.bounds import roc_summary

    assert roc_summary(lira_scores(target, shadow, shadow_in), member)[0].auc > 0.95
    scores = mlp_scores(shadow.reshape(-1, 1), shadow_in.reshape(-1), target[:, None], 0)
    assert roc_summary(scores, member)[0].auc > 0.95


def test_audit_of_a_federated_run_uses_the_clients_export_and_ledger(tmp_path: Path) -> None:
    from strategies.inprocess import run_inprocess

    config = load_config(overrides=[*TINY, f"output_dir='{tmp_path}'", "federation.rounds=2",
                                     "federation.local_epochs=1",
                                     "privacy.mode='target-epsilon'", "privacy.epsilon=4.0",
                                     "clustering.backend='plaintext'", "audit.shadows=2",
                                     "audit.canaries=32"])
    run_dir = run_inprocess(config, 2)
    audit_config = load_config(run_dir / "config.toml",
                               ["audit.shadows=2", "audit.canaries=32", "audit.client=1"])
    result = run_audit(audit_config, run_dir, progress=False)
    report = json.loads((run_dir / "audit.json").read_text())
    assert report == json.loads(json.dumps(result.report))
    member = report["membership"]
    assert "client-1" in member["target"] and member["target"].endswith("prompt)")
    ledger = next(run_dir.glob("client-state/run-*/client-1/privacy_ledger.json"))
    assert member["target_epsilon"] == pytest.approx(json.loads(ledger.read_text())
                                                     ["entries"][-1]["epsilon"])
    assert set(member["attacks"]) == {"loss", "lira", "shadow-mlp", "prompt-vector"}
    for row in member["attacks"].values():
        assert 0.0 <= row["auc"] <= 1.0 and row["members"] > 0 and row["non_members"] > 0
    one = report["one_run"]
    assert one["epsilon_lower_bound"] <= one["accountant_epsilon"] <= 4.0 * (1 + 1e-6)
    assert report["privacy_level"].startswith("record-level")
    assert (run_dir / "audit_roc.png").stat().st_size > 0
    assert (run_dir / "audit_canaries.png").stat().st_size > 0


def test_cli_refuses_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    from fedprompt.cli import main

    assert main(["audit", str(tmp_path)]) == 2
    assert "not a results folder" in capsys.readouterr().err


def test_a_generative_backbone_is_refused_with_a_reason() -> None:
    from fedprompt.errors import ConfigError

    config = load_config(overrides=["backbone.model='llava-tiny'"])
    with pytest.raises(ConfigError, match="generative"):
        run_audit(config, progress=False)
