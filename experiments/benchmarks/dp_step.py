"""Time of one training step: non-private, our DP step, Opacus functorch-mode DP step.

    python experiments/benchmarks/dp_step.py [--model clip-small] [--classes 100]
        [--batch 32] [--learner dpfpl] [--n-ctx 16] [--repeats 3] [--threads 2]

All three train the same prompt learner on the same batch of cached image features:

* non-private: one text-encoder pass for all classes, ordinary backward, optimizer step;
* ours: one text-encoder pass, exact per-sample gradients of the privatized tensors by
  batched vector-Jacobian products, Opacus' DPOptimizer for clipping + noise + accounting,
  then the learner's update (DP-FPL: Eq. 4);
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

import torch

from fedprompt.backbones import CLIPBackbone
from fedprompt.config import PromptConfig, TrainConfig
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.dp_sgd import DPLocalTrainer
from fedprompt.privacy.opacus_head import PromptLogitsHead
from fedprompt.privacy.per_sample import per_sample_gradients
from fedprompt.prompts import build_prompt_learner
from fedprompt.training import LocalTrainer, PromptedClassifier


def _names(n: int) -> list[str]:
    words = ["red", "green", "blue", "small", "large", "round", "striped", "wild", "old", "tiny"]
    return [f"{words[i % 10]} {words[(i // 10) % 10]} object" for i in range(n)]


def _best(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure(args: argparse.Namespace, prefix: bool) -> dict:
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    backbone = CLIPBackbone.from_preset(args.model)
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
    t_plain = _best(lambda: plain.train_step(features, labels), args.repeats)

    ours_clf = classifier()
    ours = DPLocalTrainer(ours_clf, config, 100, noise_multiplier=1.0, clip_norm=1.0,
                          sample_rate=args.batch / 1000, expected_batch_size=args.batch,
                          accountant=Accountant("rdp"), chunk=args.chunk)
    t_ours = _best(lambda: ours.train_step(features, labels), args.repeats)

    ft_clf = classifier()
    learner = ft_clf.learner
    private = learner.local_dp_names()
    head = PromptLogitsHead(ft_clf, private)
    module = GradSampleModule(head, force_functorch=True, loss_reduction="mean")
    params = [getattr(learner, n) for n in private]
    dp_opt = DPOptimizer(torch.optim.SGD(params, lr=0.0), noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=args.batch)
    optimizer = torch.optim.SGD(learner.trainable_parameters(), lr=0.01)

    def functorch_step() -> None:
        learner.prepare_step()
        optimizer.zero_grad(set_to_none=True)
        dp_opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(module(features), labels).backward()
        dp_opt.pre_step()
        learner.finalize_gradients()
        optimizer.step()

    t_functorch = _best(functorch_step, args.repeats)

    # per-sample gradients of both paths at the same point
    module._close()
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
    return {"prefix_sharing": prefix, "nonprivate_s": t_plain, "ours_dp_s": t_ours,
            "functorch_dp_s": t_functorch, "ours_vs_functorch": t_functorch / t_ours,
            "ours_vs_nonprivate": t_ours / t_plain, "per_sample_max_abs_diff": diff}


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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(args, False)] if args.no_prefix else [measure(args, True),
                                                           measure(args, False)]
    print(f"one training step: {args.model}, {args.classes} classes, batch {args.batch}, "
          f"{args.learner}, n_ctx {args.n_ctx}, {args.threads} threads, best of "
          f"{args.repeats}")
    print(f"{'text path':<14}{'non-private s':>14}{'ours DP s':>11}{'functorch DP s':>16}"
          f"{'functorch/ours':>16}{'ours/non-private':>18}{'max |diff|':>12}")
    for r in rows:
        path = "shared prefix" if r["prefix_sharing"] else "per class"
        print(f"{path:<14}{r['nonprivate_s']:>14.3f}{r['ours_dp_s']:>11.3f}"
              f"{r['functorch_dp_s']:>16.3f}{r['ours_vs_functorch']:>15.1f}x"
              f"{r['ours_vs_nonprivate']:>17.1f}x{r['per_sample_max_abs_diff']:>12.2e}")
    print(json.dumps({"benchmark": "dp_step", "model": args.model, "classes": args.classes,
                      "batch": args.batch, "learner": args.learner, "n_ctx": args.n_ctx,
                      "threads": args.threads, "chunk": args.chunk, "results": rows}))


if __name__ == "__main__":
    main()
