"""Soft prompts in a frozen LLaVA: sequences, losses, scoring and greedy generation.

A learner's context ``[K, n_ctx, d]`` (``K = 1``: one context; ``K = C``: one per class,
e.g. the hierarchical learner) becomes ``n_ctx`` input embeddings of the language model.
Every sequence is laid out (``task.prompt_position``)::

    prefix:       [ctx x n_ctx] [BOS] [image x N] question  target [pad...]
    after-image:  [BOS] [image x N] [ctx x n_ctx] question  target [pad...]

``prefix`` is exactly peft's prompt-tuning layout (virtual tokens before everything;
tested equal to ``peft.PromptTuningConfig`` on the same context). ``target`` is the
answer's tokens followed by EOS; the loss is the next-token loss on the target only.
Sequences are right-padded: the language model is causal, so padding after a sequence
never changes anything before it, and no attention mask is needed. The vocabulary
projection runs only at target positions.

Losses (``task.loss``):

* ``answer``: per sample, the mean negative log-likelihood of its target tokens (needs
  ``K = 1``);
* ``ranking`` (classification): per sample, cross-entropy over the class names'
  log-likelihoods ``log p(name_c + EOS | context_c, image, question)``; sample ``i``'s
  ``C`` sequences use context ``c`` (``K = C``) or the single one.

Every sample's loss depends only on its own sequences, so with the context expanded to
one copy per sample (``[B, K, n_ctx, d]``, a leaf that requires grad) one backward pass
gives every sample's gradient with respect to its own copy, exactly
(:meth:`GenerativePromptModel.context_gradients`); :mod:`fedprompt.privacy.context_grads`
chains them to the learner's tensors for DP-SGD.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedprompt.backbones.llava import LlavaBackbone
from fedprompt.data.vqa import QASet
from fedprompt.errors import DataError, PromptError
from fedprompt.prompts.base import PromptLearner
from fedprompt.tasks.config import TaskConfig


@dataclass
class EncodedQA:
    """A :class:`QASet` ready for the language model: image features computed once
    (the vision tower is frozen), questions and answers tokenized."""

    image_embeds: Tensor  # [N, num_image_tokens, d] float32
    question_ids: list[list[int]]
    answer_ids: list[list[int]]
    labels: Tensor  # [N] long

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, indices: Tensor) -> QABatch:
        idx = indices.detach().cpu().long().tolist()
        index = torch.as_tensor(idx, dtype=torch.long, device=self.image_embeds.device)
        return QABatch(self.image_embeds[index], [self.question_ids[i] for i in idx],
                       [self.answer_ids[i] for i in idx], self.labels[torch.as_tensor(idx)])

    def select(self, indices: np.ndarray) -> EncodedQA:
        idx = [int(i) for i in indices]
        index = torch.as_tensor(idx, dtype=torch.long)
        return EncodedQA(self.image_embeds[index.to(self.image_embeds.device)],
                         [self.question_ids[i] for i in idx], [self.answer_ids[i] for i in idx],
                         self.labels[index])


@dataclass
class QABatch:
    image_embeds: Tensor  # [B, N, d]
    question_ids: list[list[int]]
    answer_ids: list[list[int]]
    labels: Tensor  # [B]

    def __len__(self) -> int:
        return len(self.question_ids)


def encode_qa(backbone: LlavaBackbone, data: QASet, batch_size: int = 64,
              device: torch.device | str = "cpu") -> EncodedQA:
    """Image features of every image (batched, no grad) and token ids of every text."""
    if len(data) == 0:
        raise DataError(f"{data.name} is empty")
    features = []
    for start in range(0, len(data), batch_size):
        images = [data.images.load(i) for i in range(start, min(start + batch_size, len(data)))]
        features.append(backbone.encode_images(backbone.preprocess(images)).to(device))
    questions = [backbone.encode_text(q) for q in data.questions]
    answers = [backbone.encode_text(a) for a in data.answers]
    for i, ids in enumerate(answers):
        if not ids:
            raise DataError(f"{data.name}: answer #{i} ({data.answers[i]!r}) has no tokens")
    return EncodedQA(torch.cat(features), questions, answers,
                     torch.as_tensor(data.labels, dtype=torch.long))


@dataclass
class LossResult:
    losses: Tensor  # [B] per-sample losses (graph to the context)
    correct: Tensor  # [B] bool: teacher-forced exact answer (answer) / top class (ranking)


class GenerativePromptModel:
    """A frozen LLaVA + a prompt learner + a task (and the class names, to classify)."""

    def __init__(self, backbone: LlavaBackbone, learner: PromptLearner, task: TaskConfig,
                 classnames: Sequence[str] | None = None) -> None:
        if learner.ctx_dim != backbone.ctx_dim:
            raise PromptError(f"learner width {learner.ctx_dim} does not match the language "
                              f"model's embedding width {backbone.ctx_dim}")
        self.backbone = backbone
        self.learner = learner
        self.task = task
        self.classnames = list(classnames or [])
        self.class_ids = [backbone.encode_text(name) for name in self.classnames]
        if task.kind == "classify" and not self.classnames:
            raise PromptError("classification needs class names")
        if task.loss == "ranking" and task.kind != "classify":
            raise PromptError("task.loss = 'ranking' ranks class names: it needs "
                              "task.kind = 'classify'")
        per_class = learner.num_classes > 1 and learner().shape[0] > 1
        if per_class and self.uses_ranking is False:
            raise PromptError(
                f"the {learner.kind} learner has one context per class, so it can only score "
                "class names: set task.kind = 'classify' and task.loss = 'ranking'"
            )
        self.per_class = per_class

    @property
    def uses_ranking(self) -> bool:
        return self.task.kind == "classify" and self.task.loss == "ranking"

    # ------------------------------------------------------------- sequences
    def _fixed(self, ctx: Tensor, image_embeds: Tensor) -> Tensor:
        """``[M, F, d]``: soft prompt, BOS and image features in the configured order."""
        backbone = self.backbone
        bos = backbone.token_embedding(torch.tensor([backbone.bos_token_id]))
        dtype = bos.dtype
        m = ctx.shape[0]
        bos = bos.unsqueeze(0).expand(m, -1, -1)
        ctx = ctx.to(backbone.device, dtype)
        image = image_embeds.to(backbone.device, dtype)
        if self.task.prompt_position == "prefix":
            return torch.cat([ctx, bos, image], dim=1)
        return torch.cat([bos, image, ctx], dim=1)

    def target_logprobs(self, ctx: Tensor, image_embeds: Tensor,
                        prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """Per sequence: summed log-probability of ``target + EOS`` after the prompt, the
        number of target tokens, and whether every target token is the argmax.

        ``ctx`` ``[M, n_ctx, d]`` and ``image_embeds`` ``[M, N, d]`` give each of the ``M``
        sequences its own soft prompt and image.
        """
        backbone = self.backbone
        device = backbone.device
        eos = backbone.eos_token_id
        fixed = self._fixed(ctx, image_embeds)
        offset = fixed.shape[1]
        texts = [list(p) + list(t) + [eos] for p, t in zip(prompts, targets, strict=True)]
        length = max(len(t) for t in texts)
        if offset + length > backbone.max_length:
            raise PromptError(f"a sequence of {offset + length} tokens exceeds the language "
                              f"model's {backbone.max_length} positions: shorten questions or "
                              "answers, or lower prompt.n_ctx")
        ids = torch.full((len(texts), length), eos, dtype=torch.long)
        rows, positions, target_ids = [], [], []
        for m, (prompt, text) in enumerate(zip(prompts, texts, strict=True)):
            ids[m, : len(text)] = torch.tensor(text)
            for j in range(len(prompt), len(text)):
                rows.append(m)
                positions.append(offset + j - 1)  # the hidden state that predicts token j
                target_ids.append(text[j])
        embeds = torch.cat([fixed, backbone.token_embedding(ids).to(fixed.dtype)], dim=1)
        hidden, _ = backbone.hidden_states(embeds)
        rows_t = torch.tensor(rows, device=device)
        logits = backbone.lm_logits(hidden[rows_t, torch.tensor(positions, device=device)])
        logprobs = logits.log_softmax(dim=-1)
        target_t = torch.tensor(target_ids, device=logits.device)
        token_lp = logprobs.gather(1, target_t[:, None]).squeeze(1)
        hit = (logits.argmax(dim=-1) == target_t).float()
        rows_t = rows_t.to(logits.device)
        m_total = len(texts)
        summed = torch.zeros(m_total, device=logits.device).index_add(0, rows_t, token_lp)
        counts = torch.zeros(m_total, device=logits.device).index_add(
            0, rows_t, torch.ones_like(token_lp))
        hits = torch.zeros(m_total, device=logits.device).index_add(0, rows_t, hit)
        return summed, counts, hits == counts

    def losses(self, ctx_per_sample: Tensor, batch: QABatch) -> LossResult:
        """Per-sample losses for contexts ``[B, K, n_ctx, d]`` (row ``i`` is sample ``i``'s
        own copy)."""
        b = len(batch)
        if ctx_per_sample.shape[0] != b:
            raise PromptError(f"{ctx_per_sample.shape[0]} contexts for {b} samples")
        if self.uses_ranking:
            scores = self.class_scores(ctx_per_sample, batch)
            labels = batch.labels.to(scores.device)
            losses = F.cross_entropy(scores, labels, reduction="none")
            return LossResult(losses, scores.argmax(dim=-1) == labels)
        if ctx_per_sample.shape[1] != 1:
            raise PromptError("the answer loss needs one context per sample (K = 1)")
        targets = batch.answer_ids
        summed, counts, exact = self.target_logprobs(
            ctx_per_sample[:, 0], batch.image_embeds, batch.question_ids, targets)
        return LossResult(-summed / counts, exact)

    def class_scores(self, ctx_per_sample: Tensor, batch: QABatch) -> Tensor:
        """``[B, C]``: log-likelihood of each class name (+ EOS) for each sample, with the
        class's own context where the learner has one per class."""
        b, k = ctx_per_sample.shape[:2]
        c = len(self.class_ids)
        if k not in (1, c):
            raise PromptError(f"{k} contexts per sample for {c} classes")
        ctx = ctx_per_sample if k == c else ctx_per_sample.expand(b, c, -1, -1)
        ctx = ctx.reshape(b * c, *ctx.shape[2:])
        images = batch.image_embeds.repeat_interleave(c, dim=0)
        prompts = [q for q in batch.question_ids for _ in range(c)]
        targets = [ids for _ in range(b) for ids in self.class_ids]
        summed, _, _ = self.target_logprobs(ctx, images, prompts, targets)
        return summed.view(b, c)

    # -------------------------------------------------------------- gradients
    def context_gradients(self, ctx: Tensor, batch: QABatch, chunk: int = 8
                          ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample gradients ``[B, K, n_ctx, d]`` of each sample's loss with respect to
        the context, per-sample losses and correctness.

        The context is copied once per sample as a leaf; one backward per chunk of samples
        gives each sample's gradient in its own copy (samples never interact).
        """
        base = ctx.detach()
        grads, losses, correct = [], [], []
        for start in range(0, len(batch), chunk):
            stop = min(start + chunk, len(batch))
            part = QABatch(batch.image_embeds[start:stop], batch.question_ids[start:stop],
                           batch.answer_ids[start:stop], batch.labels[start:stop])
            leaf = base.unsqueeze(0).expand(stop - start, *base.shape).clone()
            leaf.requires_grad_(True)
            with torch.enable_grad():
                result = self.losses(leaf, part)
                (grad,) = torch.autograd.grad(result.losses.sum(), leaf)
            grads.append(grad)
            losses.append(result.losses.detach())
            correct.append(result.correct.detach())
        return torch.cat(grads), torch.cat(losses), torch.cat(correct)

    # ------------------------------------------------------------- generation
    @torch.no_grad()
    def generate(self, ctx: Tensor, batch: QABatch, max_new_tokens: int | None = None
                 ) -> list[list[int]]:
        """Greedy answers (token ids, up to EOS) with one context ``[1, n_ctx, d]``.
        Samples are grouped by question length, so no padding is needed."""
        if ctx.shape[0] != 1:
            raise PromptError("greedy generation needs one context (the learner has one per "
                              "class); score class names instead")
        backbone = self.backbone
        limit = max_new_tokens or self.task.max_new_tokens
        out: list[list[int]] = [[] for _ in range(len(batch))]
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(batch.question_ids):
            groups.setdefault(len(q), []).append(i)
        for members in groups.values():
            idx = torch.tensor(members)
            fixed = self._fixed(ctx.expand(len(members), -1, -1),
                                batch.image_embeds[idx.to(batch.image_embeds.device)])
            questions = torch.tensor([batch.question_ids[i] for i in members], dtype=torch.long)
            questions = questions.view(len(members), -1)
            embeds = torch.cat([fixed, backbone.token_embedding(questions).to(fixed.dtype)], 1)
            hidden, cache = backbone.hidden_states(embeds, use_cache=True)
            position = embeds.shape[1]
            done = torch.zeros(len(members), dtype=torch.bool)
            for _ in range(limit):
                token = backbone.lm_logits(hidden[:, -1]).argmax(dim=-1).cpu()
                for row, i in enumerate(members):
                    if not done[row]:
                        if int(token[row]) == backbone.eos_token_id:
                            done[row] = True
                        else:
                            out[i].append(int(token[row]))
                if bool(done.all()):
                    break
                step = backbone.token_embedding(token[:, None]).to(fixed.dtype)
                positions = torch.full((len(members), 1), position, device=backbone.device)
                hidden, cache = backbone.hidden_states(step, position_ids=positions,
                                                       past_key_values=cache, use_cache=True)
                position += 1
        return out

    # -------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, data: EncodedQA, batch_size: int = 64,
                 generate: bool = True) -> dict[str, float | int]:
        """``loss`` (the training loss), ``accuracy`` (ranking accuracy when classifying,
        else exact match of the greedy answer), ``exact_match`` (greedy answer equals the
        reference, token for token; absent for per-class contexts), ``ranking_accuracy``
        (classification), ``samples``."""
        self.learner.eval()
        ctx = self.learner()
        n = len(data)
        if n == 0:
            return {"loss": float("nan"), "accuracy": float("nan"), "samples": 0}
        loss_sum, ranked, exact = 0.0, 0, 0
        for start in range(0, n, batch_size):
            batch = data.batch(torch.arange(start, min(start + batch_size, n)))
            expanded = ctx.unsqueeze(0).expand(len(batch), *ctx.shape)
            result = self.losses(expanded, batch)
            loss_sum += float(result.losses.sum())
            if self.task.kind == "classify":
                if self.uses_ranking:
                    ranked += int(result.correct.sum())
                else:
                    scores = self.class_scores(expanded, batch)
                    ranked += int((scores.argmax(-1).cpu() == batch.labels.cpu()).sum())
            if generate and not self.per_class:
                answers = self.generate(ctx, batch)
                exact += sum(int(a == ref) for a, ref in zip(answers, batch.answer_ids,
                                                            strict=True))
        metrics: dict[str, float | int] = {"loss": loss_sum / n, "samples": n}
        if generate and not self.per_class:
            metrics["exact_match"] = exact / n
        if self.task.kind == "classify":
            metrics["ranking_accuracy"] = ranked / n
            metrics["accuracy"] = ranked / n
        else:
            metrics["accuracy"] = metrics.get("exact_match", float("nan"))
        return metrics
