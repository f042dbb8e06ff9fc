"""Minion demo: a trained soft prompt as the local worker, a supervisor behind the secure
enclave channel, a private document and a private image that never leave this machine.

1. train a CoOp prompt on the offline ``llava-tiny`` (synthetic coloured squares, a few
   steps), export it in the portable format and load it back into a
   :class:`~fedprompt.minion.local_worker.PromptedLocalClient`;
2. start the reference enclave server as a subprocess on loopback (self-signed TLS
   certificate, INSECURE mock attestation, opted in on both sides), whose backend is the
   rule-based supervisor :func:`fedprompt.minion.scripted.supervisor`;
3. run the Minion protocol over a local document and a local image; print the answer, the
   local/remote token split, the timing, and check that neither the document nor the
   image reached the supervisor.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python experiments/minion_demo/run.py [--steps 40]``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from fedprompt.backbones import CLIPBackbone
from fedprompt.backbones.llava import LlavaBackbone
from fedprompt.config import TrainConfig
from fedprompt.data.datasets import ArrayImages, DataSplits, ImageSet
from fedprompt.data.synthetic import COLORS, coloured_squares
from fedprompt.data.vqa import classification_qa
from fedprompt.minion.attestation import InsecureMockAttestation
from fedprompt.minion.local_worker import PromptedLocalClient, render
from fedprompt.minion.loopback import LoopbackEnclave
from fedprompt.minion.perception import ClipPerception
from fedprompt.minion.protocol import Minion
from fedprompt.minion.secure_client import SecureChatClient
from fedprompt.prompts import CoOpPrompt
from fedprompt.prompts.portable import export_prompt
from fedprompt.tasks.config import TaskConfig
from fedprompt.tasks.generative import GenerativePromptModel, encode_qa
from fedprompt.training.generative import GenerativeTrainer
from fedprompt.training.model import PromptedClassifier
from fedprompt.training.trainer import LocalTrainer

QUESTION = "what color is the square?"
DOCUMENT = ("Field report 17 (confidential). Site: north warehouse, bay 4. Inspector: "
            "M. Okafor. The crate photographed this morning carries a coloured square "
            "marking its hazard class. Seal number 55-0913 was intact.")
TASK = QUESTION


def train_and_export(backbone: LlavaBackbone, out: Path, steps: int, lr: float) -> Path:
    pixels, labels = coloured_squares(48, seed=0)
    names = list(COLORS)
    splits = DataSplits(ImageSet("squares/train", ArrayImages(pixels[:36]), labels[:36], names),
                        ImageSet("squares/test", ArrayImages(pixels[36:]), labels[36:], names))
    # the question exactly as the worker renders a one-turn chat
    question = render([{"role": "user", "content": QUESTION}])
    qa = classification_qa(splits, question)
    task = TaskConfig(kind="classify", question=question, loss="answer", max_new_tokens=4)
    learner = CoOpPrompt(8, backbone.ctx_dim, 1, generator=torch.Generator().manual_seed(0))
    model = GenerativePromptModel(backbone, learner, task, names)
    train, test = encode_qa(backbone, qa.train), encode_qa(backbone, qa.test)
    trainer = GenerativeTrainer(model, train, TrainConfig(optimizer="adamw", lr=lr,
                                                          scheduler="constant"), steps)
    before = model.evaluate(test, 32)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(torch.arange(len(train)), train.labels)
    after = model.evaluate(test, 32)
    print(f"[train] CoOp n_ctx=8 on llava-tiny, {steps} steps in {time.perf_counter() - t0:.1f}s:"
          f" test loss {before['loss']:.3f} -> {after['loss']:.3f}, exact match "
          f"{before['exact_match']:.2f} -> {after['exact_match']:.2f}")
    folder = export_prompt(out / "prompt", learner, backbone, task=task.model_dump(),
                           classnames=names,
                           data_description=f"synthetic coloured squares, {len(train)} images")
    print(f"[export] {folder}/prompt.safetensors + prompt.json")
    return folder


def train_clip_perception(clip: CLIPBackbone, out: Path, steps: int) -> Path:
    """A CoOp prompt on the offline ``clip-tiny`` classifying the squares' colours."""
    pixels, labels = coloured_squares(48, seed=1)
    names = list(COLORS)
    images = [Image.fromarray(p) for p in pixels]
    with torch.no_grad():
        features = clip.encode_images(clip.preprocess(images))
    y = torch.as_tensor(labels)
    learner = CoOpPrompt(4, clip.ctx_dim, len(names), generator=torch.Generator().manual_seed(0))
    classifier = PromptedClassifier(clip, learner, names)
    trainer = LocalTrainer(classifier, TrainConfig(optimizer="adamw", lr=0.05,
                                                   scheduler="constant"), steps)
    for _ in range(steps):
        trainer.train_step(features[:36], y[:36])
    with torch.no_grad():
        accuracy = float((classifier(features[36:]).argmax(-1) == y[36:]).float().mean())
    print(f"[train] CLIP perception prompt (CoOp n_ctx=4, clip-tiny), {steps} steps: "
          f"held-out accuracy {accuracy:.2f}")
    return export_prompt(out / "clip_prompt", learner, clip, classnames=names,
                         data_description="synthetic coloured squares, 36 images")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--out", type=Path, default=None, help="folder for the prompt and files")
    p.add_argument("--lr", type=float, default=0.3)
    p.add_argument("--max-rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="minion-demo-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        backbone = LlavaBackbone.from_preset("llava-tiny", weights_seed=0)
        folder = train_and_export(backbone, out, args.steps, args.lr)
        clip = CLIPBackbone.from_preset("clip-tiny", weights_seed=0)
        perception = ClipPerception.from_folder(train_clip_perception(clip, out, args.steps),
                                                clip)
        worker = PromptedLocalClient.from_folder(folder, backbone, max_new_tokens=8,
                                                 perception=perception)
        print(f"[worker] loaded {worker.model_name} from the portable prompt")

        pixels, _ = coloured_squares(3, seed=7)  # label 0: red
        image_path = out / "crate.png"
        Image.fromarray(pixels[0]).save(image_path)
        doc_path = out / "report.txt"
        doc_path.write_text(DOCUMENT)
        print(f"[perception] {perception([Image.open(image_path)])} (truth: red)")
        direct, _, _ = worker.chat([{"role": "user", "content": QUESTION,
                                     "images": [str(image_path)]}])
        print(f"[worker] direct answer on the local image (truth: red): {direct[0]!r}")

        with LoopbackEnclave("callable:fedprompt.minion.scripted:supervisor") as enclave:
            remote = SecureChatClient(enclave.url, InsecureMockAttestation(),
                                      allow_insecure_mock=True, ca_cert=enclave.cert)
            print(f"[enclave] {enclave.url} (TLS self-signed, INSECURE mock attestation, "
                  "opted in)")
            try:
                minion = Minion(worker, remote, max_rounds=args.max_rounds)
                result = minion(TASK, [doc_path.read_text()], doc_metadata="one field report",
                                images=[str(image_path)])
                session = remote.session
            finally:
                remote.close()
            server_log = enclave.log.read_text()
        assert session is not None
        print(f"[attestation] provider={session.attestation.provider} "
              f"(ms) {json.dumps({k[:-2]: round(v * 1e3, 2) for k, v in session.timing.items()})}")
        for m in result.worker_messages[1:]:
            print(f"[{'supervisor->worker' if m['role'] == 'user' else 'worker->supervisor'}] "
                  f"{m['content']!r}")
        sent = "\n".join(str(m["content"]) for m in result.supervisor_messages)
        leaks = [s for s in ("Okafor", "55-0913", DOCUMENT, str(image_path)) if s in sent]
        print(f"[answer] {result.final_answer!r} after {result.rounds} round(s)")
        local, remote_u = result.local_usage, result.remote_usage
        share = remote_u.total_tokens / max(1, local.total_tokens + remote_u.total_tokens)
        print(f"[tokens] local: prompt {local.prompt_tokens} + completion "
              f"{local.completion_tokens} = {local.total_tokens}; remote"
              f"{' (estimated)' if result.timing['remote_usage_estimated'] else ''}: prompt "
              f"{remote_u.prompt_tokens} + completion {remote_u.completion_tokens} = "
              f"{remote_u.total_tokens} ({share:.0%} of all tokens)")
        t = result.timing
        print(f"[timing] local {t['local_call_time']:.3f}s, remote (secure channel + "
              f"supervisor) {t['remote_call_time']:.3f}s, total {t['total_time']:.3f}s")
        print(f"[privacy] document or image path in what the supervisor received: "
              f"{leaks or 'none'}; in the server log: "
              f"{[s for s in ('Okafor', '55-0913') if s in server_log] or 'none'}")
        if leaks:
            raise SystemExit("the private context reached the supervisor")


if __name__ == "__main__":
    main()
