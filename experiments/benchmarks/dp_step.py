"""Time of one training step: non-private, our DP step, Opacus functorch-mode DP step.

    python experiments/benchmarks/dp_step.py [--model clip-small] [--classes 100]
        [--batch 32] [--learner dpfpl] [--n-ctx 16] [--repeats 3] [--threads 2]
        [--no-functorch]

All train the same prompt learner on the same batch of cached image features:

* non-private: one text-encoder pass for all classes, ordinary backward, optimizer step;
* ours (joint): one text-encoder pass, exact per-sample gradients of **every** trained
  tensor (DP-FPL: ``p_G``, ``u``, ``v``) by batched vector-Jacobian products, clipped
  jointly, float64 CSPRNG noise (``SecureRandom``), accounting, then the learner's update
  (DP-FPL: Eq. 4): the DP step fedprompt runs;
* ours (nominal layout, Opacus noise): the step fedprompt ran before the joint fix: per-sample
  gradients of ``u``, ``v`` only, a batch-mean gradient of ``p_G`` from one more VJP, and
  Opacus' float32 ``torch.Generator`` noise. ``joint / nominal`` is what privatizing every
  tensor (and the CSPRNG) costs;
* Opacus functorch mode: GradSampleModule(force_functorch=True) around the prompted
  classifier (the text encoder runs once per sample), then the same DPOptimizer step.

Both text paths are timed: the shared-prefix path fedprompt uses, and the plain per-class
pass (``--no-prefix`` for everything). Per-sample gradients of ours and functorch's are
compared (max abs difference printed). Prints a table, then as its last line one JSON
object with the figures.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch

from fedprompt.backbones import CLIPBackbone, build_backbone
from fedprompt.config import BackboneConfig, PromptConfig, TrainConfig
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.dp_sgd import DPLocalTrainer
from fedprompt.privacy.opacus_head import PromptLogitsHead
from fedprompt.privacy.per_sample import per_sample_gradients
from fedprompt.prompts import build_prompt_learner
from fedprompt.training import LocalTrainer, PromptedClassifier


def _names(n: int) -> list[str]:
    words = ["red", "green", "blue", "small", "large", "round", "striped", "wild", "old", "tiny"]
    return [f"{words[i % 10]} {words[(i // 10) % 10]} object" for i in range(n)]


CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _best(fns: dict[str, Callable[[], object]], repeats: int, clock: str) -> dict[str, float]:
    """Best time of each function, the functions interleaved in every repeat so that a
    burst of load from other processes hits all of them alike (ratios side by side).
    ``clock = "cpu"`` counts this process's CPU seconds (all its threads), which other
    processes on a shared machine disturb far less than wall time."""
    now = CLOCKS[clock]
    for fn in fns.values():
        fn()  # warm-up
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = now()
            fn()
            best[name] = min(best[name], now() - start)
    return best


def _functorch_step(ft_clf: PromptedClassifier, features: torch.Tensor, labels: torch.Tensor,
                    batch: int) -> Callable[[], None]:
    """One Opacus functorch-mode DP step (the text encoder runs once per sample)."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    learner = ft_clf.learner
    private = learner.local_dp_names()
    module = GradSampleModule(PromptLogitsHead(ft_clf, private), force_functorch=True,
                              loss_reduction="mean")
    params = [getattr(learner, n) for n in private]
    dp_opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=batch)
    optimizer = torch.optim.SGD(learner.trainable_parameters(), lr=0.01)

    def step() -> None:
        learner.prepare_step()
        optimizer.zero_grad(set_to_none=True)
        dp_opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(features), labels).backward()
        dp_opt.pre_step()
        learner.finalize_gradients()
        optimizer.step()

    return step


def measure(args: argparse.Namespace, prefix: bool) -> dict:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    backbone = (CLIPBackbone.from_preset(args.model) if args.model.startswith("clip-")
                else build_backbone(BackboneConfig(model=args.model)))
    if hasattr(backbone, "prefix_sharing"):
        backbone.prefix_sharing = prefix
    names = _names(args.classes)
    config = TrainConfig(lr=0.01)

    def classifier() -> PromptedClassifier:
        learner = build_prompt_learner(
            PromptConfig(learner=args.learner, n_ctx=args.n_ctx, rank=min(8, args.n_ctx)),
            backbone, len(names), seed=0)
        return PromptedClassifier(backbone, learner, names)

    gen = torch.Generator().manual_seed(0)
    features = torch.randn(args.batch, backbone.embed_dim, generator=gen)
    labels = torch.randint(0, len(names), (args.batch,), generator=gen)

    plain = LocalTrainer(classifier(), config, 100)

    ours_clf = classifier()
    ours = DPLocalTrainer(ours_clf, config, 100, noise_multiplier=1.0, clip_norm=1.0,
                          sample_rate=args.batch / 1000, expected_batch_size=args.batch,
                          accountant=Accountant("rdp"), chunk=args.chunk)

    nominal_clf = classifier()
    nominal = DPLocalTrainer(nominal_clf, config, 100, noise_multiplier=1.0, clip_norm=1.0,
                             sample_rate=args.batch / 1000, expected_batch_size=args.batch,
                             accountant=Accountant("rdp"), chunk=args.chunk,
                             private_names=nominal_clf.learner.nominal_dp_names())
    nominal.dp_optimizer = DPOptimizer(torch.optim.SGD(nominal.private, lr=0.0),
                                       noise_multiplier=1.0, max_grad_norm=1.0,
                                       expected_batch_size=args.batch, loss_reduction="mean")
    steps: dict[str, Callable[[], object]] = {
        "plain": lambda: plain.train_step(features, labels),
        "joint": lambda: ours.train_step(features, labels),
        "nominal": lambda: nominal.train_step(features, labels)}
    if not args.no_functorch:
        steps["functorch"] = _functorch_step(classifier(), features, labels, args.batch)
    times = _best(steps, args.repeats, args.clock)
    t_plain, t_ours, t_nominal = times["plain"], times["joint"], times["nominal"]
    result = {"prefix_sharing": prefix, "nonprivate_s": t_plain, "ours_dp_s": t_ours,
              "nominal_opacus_noise_dp_s": t_nominal, "joint_vs_nominal": t_ours / t_nominal,
              "ours_vs_nonprivate": t_ours / t_plain}
    if args.no_functorch:
        return result
    t_functorch = times["functorch"]

    # per-sample gradients of both paths at the same point
    ft_clf = classifier()
    learner = ft_clf.learner
    private = learner.local_dp_names()
    params = [getattr(learner, n) for n in private]
    learner.prepare_step()
    for p in params:
        p.grad_sample = None
    reference_module = GradSampleModule(PromptLogitsHead(ft_clf, private),
                                        force_functorch=True, loss_reduction="sum")
    loss = torch.nn.functional.cross_entropy(reference_module(features), labels,
                                             reduction="sum")
    loss.backward()
    reference = [p.grad_sample.clone() for p in params]
    reference_module._close()
    mine = per_sample_gradients(ft_clf, features, labels, params, [], args.chunk).per_sample
    diff = max(float((a - b).abs().max()) for a, b in zip(mine, reference, strict=True))
    return result | {"functorch_dp_s": t_functorch, "ours_vs_functorch": t_functorch / t_ours,
                     "per_sample_max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clip-small")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--learner", default="dpfpl")
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-prefix", action="store_true", help="only the per-class path")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu",
                        help="cpu: CPU seconds of this process (robust to other load); wall")
    parser.add_argument("--no-functorch", action="store_true",
                        help="skip Opacus' functorch mode (slow on large text encoders)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    prefix_paths = args.model.startswith("clip-") and not args.no_prefix
    rows = [measure(args, True), measure(args, False)] if prefix_paths else [
        measure(args, False)]
    print(f"one training step: {args.model}, {args.classes} classes, batch {args.batch}, "
          f"{args.learner}, n_ctx {args.n_ctx}, {args.threads} threads, best of "
          f"{args.repeats}, {args.clock} seconds")
    print(f"{'text path':<14}{'non-private s':>14}{'nominal DP s':>13}{'joint DP s':>11}"
          f"{'joint/nominal':>14}{'functorch DP s':>16}{'functorch/joint':>16}"
          f"{'joint/non-private':>18}{'max |diff|':>12}")
    for r in rows:
        path = "shared prefix" if r["prefix_sharing"] else "per class"
        functorch = (f"{r['functorch_dp_s']:>16.3f}{r['ours_vs_functorch']:>15.1f}x"
                     if "functorch_dp_s" in r else f"{'-':>16}{'-':>16}")
        diff = f"{r['per_sample_max_abs_diff']:>12.2e}" if "functorch_dp_s" in r else (
            f"{'-':>12}")
        print(f"{path:<14}{r['nonprivate_s']:>14.3f}{r['nominal_opacus_noise_dp_s']:>13.3f}"
              f"{r['ours_dp_s']:>11.3f}{r['joint_vs_nominal']:>13.2f}x{functorch}"
              f"{r['ours_vs_nonprivate']:>17.1f}x{diff}")
    print(json.dumps({"benchmark": "dp_step", "model": args.model, "classes": args.classes,
                      "batch": args.batch, "learner": args.learner, "n_ctx": args.n_ctx,
                      "threads": args.threads, "chunk": args.chunk, "clock": args.clock,
                      "results": rows}))


if __name__ == "__main__":
    main()
