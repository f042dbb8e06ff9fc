"""Peak memory and time of one training step on a 1,000-class prompt.

    python experiments/benchmarks/text_memory.py [--model clip-small] [--classes 1000]
                                                 [--n-ctx 16] [--learner coop] [--threads 2]

Each configuration runs in a fresh subprocess (so peaks do not mix): the whole text side
in one call, chunks of classes, and chunks with gradient checkpointing. Prints a table,
then as its last line one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

CONFIGS = [
    ("one call, no checkpointing", 100_000, False),
    ("chunks of 128 classes", 128, False),
    ("chunks of 128 + checkpointing", 128, True),
]


def _class_names(n: int) -> list[str]:
    words = ["red", "green", "blue", "small", "large", "round", "striped", "wild", "old", "tiny",
             "spotted", "winged", "golden", "silver", "long", "short"]
    return [f"{words[i % 16]} {words[(i // 16) % 16]} {words[(i // 256) % 16]} object"
            for i in range(n)]


def _child(args: argparse.Namespace) -> None:
    import resource

    import torch

    from fedprompt.backbones import CLIPBackbone
    from fedprompt.config import PromptConfig, TrainConfig
    from fedprompt.prompts import build_prompt_learner
    from fedprompt.training import LocalTrainer, PromptedClassifier

    torch.set_num_threads(args.threads)
    backbone = CLIPBackbone.from_preset(args.model, text_chunk_size=args.chunk,
                                        gradient_checkpointing=args.checkpoint)
    names = _class_names(args.classes)
    learner = build_prompt_learner(PromptConfig(learner=args.learner, n_ctx=args.n_ctx),
                                   backbone, len(names))
    trainer = LocalTrainer(PromptedClassifier(backbone, learner, names), TrainConfig(), 10)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    features = torch.randn(32, backbone.embed_dim)
    labels = torch.randint(0, len(names), (32,))
    times = []
    for _ in range(3):
        start = time.perf_counter()
        trainer.train_step(features, labels)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_rss_mib": peak / 1024, "step_rss_mib": (peak - before) / 1024,
                      "step_s": min(times)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="clip-small")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n-ctx", type=int, default=16)
    parser.add_argument("--learner", default="coop")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.chunk is not None:
        _child(args)
        return
    results = []
    for label, chunk, checkpoint in CONFIGS:
        cmd = [sys.executable, __file__, "--model", args.model, "--classes", str(args.classes),
               "--n-ctx", str(args.n_ctx), "--learner", args.learner, "--threads",
               str(args.threads), "--chunk", str(chunk)] + (["--checkpoint"] if checkpoint else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                             env=os.environ | {"HF_HUB_OFFLINE": "1"})
        figures = json.loads(out.stdout.strip().splitlines()[-1])
        results.append({"config": label, "chunk": chunk, "checkpoint": checkpoint, **figures})
    print(f"1 training step, {args.classes} classes, {args.learner}, n_ctx {args.n_ctx}, "
          f"{args.model}, batch 32, {args.threads} threads")
    print(f"{'':<32}{'peak RSS MiB':>14}{'step RSS MiB':>14}{'step s':>9}")
    for r in results:
        print(f"{r['config']:<32}{r['peak_rss_mib']:>14.0f}{r['step_rss_mib']:>14.0f}"
              f"{r['step_s']:>9.2f}")
    base = results[0]["step_rss_mib"]
    best = results[-1]["step_rss_mib"]
    print(f"checkpointed chunks use {base / max(best, 1):.1f}x less step memory than one call")
    print(json.dumps({"benchmark": "text_memory", "model": args.model, "classes": args.classes,
                      "learner": args.learner, "n_ctx": args.n_ctx, "results": results}))


if __name__ == "__main__":
    main()
