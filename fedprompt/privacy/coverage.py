"""Which released figure is covered by which epsilon (replies, results, exports).

An epsilon bounds everything its party releases. A client's train reply therefore carries
by default only fields that are either covered by its record-level DP mechanism
(post-processing of its noised updates) or computed from public quantities; the server's
results carry no per-client figure that no epsilon covers. Figures computed from the
training data outside the noised path (a client's train loss and accuracy, the un-clipped
norm of a client's update) are released only with ``privacy.diagnostics = true`` and are
then labelled "not covered by epsilon". With ``privacy.mode = "off"`` nothing is private
and nothing is filtered.

:data:`REPLY_FIELDS` and :data:`SERVER_FIELDS` say, for each field, what covers it;
:func:`coverage_report` writes that table into every run's ``metrics.json``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedprompt.config import PrivacyConfig

PUBLIC = "public: computed from the configuration and the client's data size (public, as " \
    "Opacus assumes; docs/privacy.md)"
RECORD_LEVEL = "the client's record-level epsilon (post-processing of its noised updates)"
HELD_OUT = ("post-processing of the client's released prompt on its held-out test split: "
            "covered for its training records; the test records themselves are not protected")
VALIDATION = ("post-processing of the client's released prompt on its validation split "
              "(training examples held out of training, data.validation_fraction): covered "
              "for its training records; the validation records themselves are not "
              "protected")
NOT_COVERED = "NOT covered by any epsilon (computed from training data without noise)"

#: fields of a client's train reply, and what covers each
REPLY_FIELDS: dict[str, str] = {
    "partition-id": "the client's claimed id (public; the server keys by authenticated node)",
    "server-round": "public (the round of the message)",
    "num-examples": PUBLIC,
    "steps": PUBLIC,
    "sample-rate": PUBLIC,
    "noise-multiplier": PUBLIC,
    "epsilon": PUBLIC + " (the accountant's output)",
    "nominal-epsilon": "public (the configured nominal epsilon; not a guarantee)",
    "declined": PUBLIC + " (whether the next round would exceed the budget)",
    "update": RECORD_LEVEL,
    "cluster-share": RECORD_LEVEL + " (reduced from the client's released first update)",
    "train-loss": NOT_COVERED,
    "train-accuracy": NOT_COVERED,
}
#: fields of a client's evaluate reply
EVALUATE_FIELDS: dict[str, str] = {
    "partition-id": REPLY_FIELDS["partition-id"],
    "num-examples": "the size of the client's test split (public, as its data size)",
    "local-*": HELD_OUT,
    "neighbor-*": HELD_OUT,
    "val-*": VALIDATION,
}
#: per-client figures the server records about a round's updates
SERVER_FIELDS: dict[str, str] = {
    "accepted": "count of valid replies (server-side bookkeeping)",
    "rejected": "which replies failed validation and why (reasons carry no data values)",
    "noise_std": "public (noise multiplier, clip and denominator)",
    "global_epsilon": "public (the server accountant's output)",
    "update_norms": NOT_COVERED + " at the user level: each client's un-clipped update norm",
    "clipped": NOT_COVERED + " at the user level: how many client updates were clipped",
    "clusters (secfpp)": "per cluster: the DP-released sizes and denominators and public noise "
    "figures; 'members'/'clients' and 'cluster_of'/'assignments_next' are each client's own "
    "label, a function of its submission and the public centres: covered for its records by "
    "its record-level epsilon (with local DP), not at the user level (docs/secfpp.md)",
    "clustering (secfpp)": "the DP clustering's released values (noisy sums, scores, sizes), "
    "accounted in the server ledger",
}

#: train-reply metrics released only with privacy.diagnostics = true (under DP)
UNCOVERED_REPLY_METRICS = tuple(k for k, v in REPLY_FIELDS.items() if v == NOT_COVERED)
#: server-record keys released only with privacy.diagnostics = true (under DP)
UNCOVERED_SERVER_FIELDS = ("update_norms", "clipped")


def filters_apply(privacy: PrivacyConfig) -> bool:
    """Whether uncovered figures are withheld: DP is on and diagnostics were not asked."""
    return privacy.mode != "off" and not privacy.diagnostics


def covered_reply_metrics(metrics: Mapping[str, Any], privacy: PrivacyConfig
                          ) -> dict[str, Any]:
    """``metrics`` without the fields no epsilon covers (unless diagnostics are on)."""
    if not filters_apply(privacy):
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k not in UNCOVERED_REPLY_METRICS}


def covered_server_info(info: Mapping[str, Any], privacy: PrivacyConfig) -> dict[str, Any]:
    """The server's per-round record without per-client figures no epsilon covers (at the
    top level and in each cluster's record of a clustered method)."""
    if not filters_apply(privacy):
        return dict(info)

    def strip(record: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in record.items() if k not in UNCOVERED_SERVER_FIELDS}

    covered = strip(info)
    if isinstance(info.get("clusters"), Mapping):
        covered["clusters"] = {c: strip(r) for c, r in info["clusters"].items()}
    return covered


def privacy_guarantee(privacy: PrivacyConfig) -> str:
    """One line: what the run's epsilons guarantee."""
    if privacy.mode == "off":
        return "none: no noise was added"
    if privacy.mode == "nominal":
        return ("none: nominal recipe (the papers' layout leaves the shared prompt un-noised "
                "and the noise ignores the step count); epsilons are labelled, not guarantees")
    parts = []
    if privacy.local:
        parts.append("record-level per client (joint DP-SGD on every trained tensor)")
    if privacy.server:
        parts.append("user-level at the server (clipped, noised aggregate)")
    return "; ".join(parts) if parts else "none: privacy.local and privacy.server are off"


def coverage_report(privacy: PrivacyConfig) -> dict[str, Any]:
    """What covers each released field of this run (written into ``metrics.json``)."""
    if privacy.mode == "off":
        summary = "no differential privacy: no field is covered by an epsilon"
    elif privacy.mode == "nominal":
        summary = ("nominal recipe: the local layout leaves tensors un-noised, so no field "
                   "is covered by a valid epsilon")
    elif filters_apply(privacy):
        summary = ("replies and results carry only the fields below that an epsilon covers "
                   "or that are public; uncovered fields were withheld")
    else:
        summary = ("privacy.diagnostics = true: fields marked NOT covered were released "
                   "too and are not covered by any epsilon")
    local = privacy.mode != "off" and privacy.local
    withheld = list(UNCOVERED_REPLY_METRICS + UNCOVERED_SERVER_FIELDS) if filters_apply(
        privacy) else []
    return {
        "summary": summary,
        "diagnostics": privacy.diagnostics,
        "withheld": withheld,
        "train_reply": {k: (v if local or not v.startswith(RECORD_LEVEL)
                            else NOT_COVERED + " (no local DP)")
                        for k, v in REPLY_FIELDS.items()},
        "evaluate_reply": dict(EVALUATE_FIELDS),
        "server": dict(SERVER_FIELDS),
    }


def export_privacy(privacy: PrivacyConfig, *, party: str, record_epsilon: float | None,
                   steps: int, dp_tensors: list[str], shared: list[str], personal: list[str],
                   server_epsilon: float | None) -> dict[str, Any]:
    """The guarantee of a client's exported prompt (its personal part + the server's
    shared part), for the ``privacy`` block of the portable prompt format.

    With local DP (a valid mode) the whole export is covered by the client's record-level
    epsilon: its personal part was trained from noised gradients only, and the server's
    shared part is computed from the clients' noised updates (post-processing for this
    client's records). With server DP the shared part also has the server's user-level
    epsilon (as the server reported it). Whatever neither covers is listed as un-noised.
    """
    valid = privacy.mode in ("target-epsilon", "noise-multiplier")
    record = None
    if privacy.mode != "off" and privacy.local and record_epsilon is not None:
        record = {"party": party, "epsilon": record_epsilon if valid else None,
                  "accountant_epsilon": record_epsilon, "delta": privacy.delta,
                  "accountant": privacy.accountant, "steps": steps,
                  "privatized_tensors": list(dp_tensors), "covers": shared + personal
                  if valid else [], "valid": valid}
    user = None
    if valid and privacy.server and server_epsilon is not None:
        user = {"party": "server", "epsilon": server_epsilon, "delta": privacy.delta,
                "accountant": privacy.accountant, "covers": list(shared),
                "source": "reported by the server with the shared tensors"}
    covered = set(record["covers"]) if record else set()
    covered |= set(user["covers"]) if user else set()
    unnoised = [n for n in shared + personal if n not in covered]
    if not valid:
        guarantee = privacy_guarantee(privacy)
    elif record is not None:
        guarantee = "record-level: the whole prompt is covered by the client's epsilon"
    elif user is not None:
        guarantee = "user-level for the shared part only; the personal part is not private"
    else:
        guarantee = "none: no part of this prompt was trained under DP"
    return {
        "mode": privacy.mode,
        "guarantee": guarantee,
        # the headline figures older readers of the format use: the valid record-level
        # epsilon, else none
        "epsilon": record["epsilon"] if record else None,
        "delta": privacy.delta if record and valid else None,
        "accountant": privacy.accountant if record and valid else None,
        "nominal_epsilon": privacy.epsilon if privacy.mode == "nominal" else None,
        "record_level": record,
        "user_level": user,
        "unnoised_tensors": unnoised,
    }
