"""Empirical privacy audits of a client's released prompt (``fedprompt audit``).

* :mod:`~fedprompt.audit.membership`: membership inference (loss, LiRA, shadow-model MLP,
  prompt-vector) against the client's prompt;
* :mod:`~fedprompt.audit.one_run`: the one-run audit's epsilon lower bound, beside the
  accountant's epsilon;
* :mod:`~fedprompt.audit.bounds`: the statistics (ROC figures, the one-run bound);
* :mod:`~fedprompt.audit.run`: the command's orchestration and outputs.

An audit never proves privacy: it can catch a violation (a lower bound above the
accountant's epsilon) and shows how much slack the analysis has.
"""

from fedprompt.audit.bounds import epsilon_lower_bound, one_run_p_value, roc_summary
from fedprompt.audit.run import AuditResult, run_audit

__all__ = ["AuditResult", "epsilon_lower_bound", "one_run_p_value", "roc_summary", "run_audit"]
