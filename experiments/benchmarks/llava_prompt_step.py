"""Step time and peak memory of soft-prompt training on LLaVA: non-private vs DP-SGD.

    python experiments/benchmarks/llava_prompt_step.py [--models llava-tiny,llava-small]
        [--batch 16] [--n-ctx 8] [--learner dpfpl] [--loss answer] [--classes 10]
        [--repeats 5] [--threads 2] [--device auto] [--precision fp32] [--no-loop]

For every model, side by side, on the same batch (random images, the question "what is
shown in the image? answer:", class names as answers):

* ``plain``: one forward and backward of the language model for the batch (image features
  cached, as in training), optimizer step;
* ``dp``: our DP-SGD step: the same single forward/backward with the context copied per
  sample (exact per-sample gradients), chained to the privatized tensors, Opacus'
  DPOptimizer clipping + noise + accounting, the learner's update;
* ``dp-loop`` (unless ``--no-loop``): the reference a DP step would cost without that
  trick: one forward/backward per sample.

Each (model, step) pair runs in a fresh subprocess so that peak memory is its own: on
CUDA ``torch.cuda.max_memory_allocated`` above the state after setup; on CPU the growth of
the process's peak resident set (``ru_maxrss``) from after setup through the warm-up and
timed steps. Time: best of ``--repeats`` after a warm-up.
Prints a table, then one JSON line with every figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _worker(args: argparse.Namespace) -> dict:
    from fedprompt.backbones.base import resolve_device
    from fedprompt.backbones.llava import LlavaBackbone
    from fedprompt.config import PromptConfig, TrainConfig
    from fedprompt.privacy.accounting import Accountant
    from fedprompt.prompts import build_prompt_learner
    from fedprompt.tasks.config import TaskConfig
    from fedprompt.tasks.generative import EncodedQA, GenerativePromptModel
    from fedprompt.training.generative import DPGenerativeTrainer, GenerativeTrainer

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    backbone = LlavaBackbone.from_preset(args.model, device=device, precision=args.precision)
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
             "nine", "airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
             "horse", "ship", "truck"][: args.classes]
    size = backbone.model.config.vision_config.image_size
    pixels = torch.rand(args.batch, 3, size, size)
    embeds = backbone.encode_images(pixels)
    question = backbone.encode_text("what is shown in the image? answer:")
    labels = torch.arange(args.batch) % len(names)
    data = EncodedQA(embeds, [question] * args.batch,
                     [backbone.encode_text(names[int(y)]) for y in labels], labels)
    prompt = PromptConfig(learner=args.learner, n_ctx=args.n_ctx, rank=min(4, args.n_ctx))
    learner = build_prompt_learner(prompt, backbone, len(names))  # type: ignore[arg-type]
    model = GenerativePromptModel(backbone, learner, TaskConfig(loss=args.loss), names)
    config = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0,
                         scheduler="constant")
    idx = torch.arange(args.batch)
    if args.step == "plain":
        trainer = GenerativeTrainer(model, data, config, 10**6, chunk=args.batch)

        def step() -> None:
            trainer.train_step(idx, labels)
    elif args.step == "dp":
        trainer = DPGenerativeTrainer(model, data, config, 10**6, noise_multiplier=1.0,
                                      clip_norm=1.0, sample_rate=0.01,
                                      expected_batch_size=args.batch,
                                      accountant=Accountant("rdp"), chunk=args.batch)

        def step() -> None:
            trainer.train_step(idx, labels)
    else:  # dp-loop: per-sample gradients by one forward/backward per sample
        private = [getattr(learner, n) for n in learner.local_dp_names()]

        def step() -> None:
            learner.prepare_step()
            for i in range(args.batch):
                out = model.losses(learner().unsqueeze(0), data.batch(idx[i : i + 1]))
                torch.autograd.grad(out.losses[0], private, allow_unused=True)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up (its peak memory counts: later steps reuse what it touched)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    result = {
        "model": args.model, "step": args.step, "batch": args.batch, "n_ctx": args.n_ctx,
        "learner": args.learner, "loss": args.loss, "classes": len(names),
        "device": str(device), "precision": args.precision,
        "params": sum(p.numel() for p in backbone.parameters()),
        "step_ms": 1000 * min(times), "step_ms_median": 1000 * sorted(times)[len(times) // 2],
    }
    if cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        result["memory"] = "cuda max_memory_allocated above setup"
    else:
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
        result["peak_mb"] = grown / 1024  # ru_maxrss is in KiB on Linux
        result["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["memory"] = "growth of peak RSS over warm-up + timed steps (CPU)"
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="llava-tiny,llava-small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--n-ctx", type=int, default=8)
    parser.add_argument("--learner", default="dpfpl")
    parser.add_argument("--loss", default="answer", choices=["answer", "ranking"])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--no-loop", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    steps = ["plain", "dp"] + ([] if args.no_loop else ["dp-loop"])
    rows = []
    for model in args.models.split(","):
        for step in steps:
            command = [sys.executable, __file__, "--worker", "--model", model, "--step", step]
            for key in ("batch", "n_ctx", "learner", "loss", "classes", "repeats", "threads",
                        "device", "precision"):
                command += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            out = subprocess.run(command, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                raise RuntimeError(f"{model} {step} failed:\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'model':<12} {'step':<8} {'params':>11} {'ms/step':>9} {'median':>9} "
          f"{'peak MB':>8}")
    for r in rows:
        print(f"{r['model']:<12} {r['step']:<8} {r['params']:>11,} {r['step_ms']:>9.1f} "
              f"{r['step_ms_median']:>9.1f} {r['peak_mb']:>8.1f}")
    for model in args.models.split(","):
        by = {r["step"]: r for r in rows if r["model"] == model}
        line = f"{model}: dp / plain = {by['dp']['step_ms'] / by['plain']['step_ms']:.2f}x"
        if "dp-loop" in by:
            line += f", dp-loop / dp = {by['dp-loop']['step_ms'] / by['dp']['step_ms']:.2f}x"
        print(line)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
