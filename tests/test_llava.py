"""LLaVA soft prompts: backbone path, peft equivalence, per-sample gradients, DP step,
generation, JSONL data, portable prompts, federated round (tiny offline model)."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedprompt.backbones.llava import IMAGE_TOKEN_ID, LlavaBackbone, is_llava_source
from fedprompt.config import RunConfig, TrainConfig
from fedprompt.data.synthetic import COLORS, coloured_squares
from fedprompt.data.vqa import jsonl_qa
from fedprompt.errors import DataError, PromptError
from fedprompt.privacy.accounting import Accountant
from fedprompt.privacy.context_grads import chain_to_parameters
from fedprompt.prompts import CoOpPrompt, DPFPLPrompt, HierarchicalPrompt
from fedprompt.prompts.portable import PromptCompatibilityError, export_prompt, load_prompt
from fedprompt.tasks.config import TaskConfig
from fedprompt.tasks.generative import GenerativePromptModel, encode_qa
from fedprompt.training.generative import DPGenerativeTrainer, GenerativeTrainer


@pytest.fixture(scope="module")
def llava64(llava) -> LlavaBackbone:
    """The same tiny LLaVA in float64 (for exactness claims)."""
    double = copy.deepcopy(llava)
    double.model.double()
    return double


def _model(llava, learner, classnames, **task):
    return GenerativePromptModel(llava, learner, TaskConfig(**task), classnames)


# ------------------------------------------------------------------ backbone
def test_presets_identity_and_sources(llava):
    assert llava.num_image_tokens == 16 and llava.ctx_dim == 64
    again = LlavaBackbone.from_preset("llava-tiny", weights_seed=0)
    other = LlavaBackbone.from_preset("llava-tiny", weights_seed=1)
    assert again.identity() == llava.identity()
    assert other.identity()["config_sha256"] == llava.identity()["config_sha256"]
    assert other.identity()["weights_fingerprint"] != llava.identity()["weights_fingerprint"]
    assert is_llava_source("llava-small") and is_llava_source("llava-hf/llava-1.5-7b-hf")
    assert not is_llava_source("clip-tiny")


def test_embeddings_path_equals_llava_forward(llava, color_qa):
    """Our layout (context, BOS, cached image features, question, answer) gives the same
    log-likelihood as LlavaForConditionalGeneration on input ids + pixels, when the
    context holds real token embeddings."""
    ctx_ids = llava.encode_text("a photo of")
    ctx = llava.token_embedding(torch.tensor(ctx_ids))
    data = encode_qa(llava, color_qa.train.subset(np.arange(2)))
    model = _model(llava, CoOpPrompt(len(ctx_ids), 64, 3), color_qa.classnames)
    batch = data.batch(torch.arange(2))
    ours, counts, _ = model.target_logprobs(ctx.expand(2, -1, -1), batch.image_embeds,
                                            batch.question_ids, batch.answer_ids)
    pixels = llava.preprocess([color_qa.train.images.load(i) for i in range(2)])
    for i in range(2):
        ids = (ctx_ids + [llava.bos_token_id] + [IMAGE_TOKEN_ID] * 16
               + batch.question_ids[i] + batch.answer_ids[i] + [llava.eos_token_id])
        with torch.no_grad():
            logits = llava.model(input_ids=torch.tensor([ids]),
                                 pixel_values=pixels[i : i + 1]).logits[0]
        n = int(counts[i])
        lp = logits[-n - 1 : -1].log_softmax(-1).gather(1, torch.tensor(ids[-n:])[:, None])
        assert float(lp.sum()) == pytest.approx(float(ours[i]), abs=1e-4)


def test_prefix_layout_equals_peft_prompt_tuning(llava, color_qa):
    peft = pytest.importorskip("peft")
    learner = CoOpPrompt(4, 64, 3, generator=torch.Generator().manual_seed(3))
    model = _model(llava, learner, color_qa.classnames)
    data = encode_qa(llava, color_qa.train.subset(np.arange(1)))
    batch = data.batch(torch.arange(1))
    ours, counts, _ = model.target_logprobs(learner(), batch.image_embeds, batch.question_ids,
                                            batch.answer_ids)
    fresh = LlavaBackbone.from_preset("llava-tiny", weights_seed=0).model
    wrapped = peft.get_peft_model(fresh, peft.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                 num_virtual_tokens=4))
    with torch.no_grad():
        wrapped.prompt_encoder["default"].embedding.weight.copy_(learner.ctx)
    ids = ([llava.bos_token_id] + [IMAGE_TOKEN_ID] * 16 + batch.question_ids[0]
           + batch.answer_ids[0] + [llava.eos_token_id])
    pixels = llava.preprocess([color_qa.train.images.load(0)])
    with torch.no_grad():
        logits = wrapped(input_ids=torch.tensor([ids]), pixel_values=pixels).logits[0]
    n = int(counts[0])
    lp = logits[-n - 1 : -1].log_softmax(-1).gather(1, torch.tensor(ids[-n:])[:, None])
    assert float(lp.sum()) == pytest.approx(float(ours[0].detach()), abs=1e-4)


# ------------------------------------------------------------ per-sample grads
@pytest.mark.parametrize("learner_kind,loss", [("dpfpl", "answer"), ("dpfpl", "ranking"),
                                               ("hierarchical", "ranking"),
                                               ("coop", "answer")])
@pytest.mark.parametrize("layout", ["joint", "nominal"])
def test_per_sample_gradients_equal_per_example_loop(llava64, color_qa, learner_kind, loss,
                                                     layout):
    """Exactness claim, so the model runs in float64: the batched path and the one-example
    loop then agree to ~1e-12 whatever the thread count (float32 differed by up to 2e-5
    between 1 and 2 threads)."""
    gen = torch.Generator().manual_seed(0)
    if learner_kind == "dpfpl":
        learner = DPFPLPrompt(4, 64, 3, rank=2, generator=gen)
    elif learner_kind == "hierarchical":
        learner = HierarchicalPrompt(4, 64, 3, generator=gen)
        with torch.no_grad():
            learner.class_ctx.normal_(0, 0.02, generator=gen)
    else:
        learner = CoOpPrompt(4, 64, 3, generator=gen)
    learner.double()
    model = _model(llava64, learner, color_qa.classnames, loss=loss,
                   prompt_position="after-image" if learner_kind == "coop" else "prefix")
    data = encode_qa(llava64, color_qa.train.subset(np.arange(5)))
    names = learner.local_dp_names() if layout == "joint" else learner.nominal_dp_names()
    private = [getattr(learner, n) for n in names]
    public = [getattr(learner, n) for n in learner.gradient_names() if n not in names]
    learner.prepare_step()
    ctx = learner()
    grads, losses, _ = model.context_gradients(ctx, data.batch(torch.arange(5)), chunk=2)
    assert grads.dtype == torch.float64
    per_sample, public_grads = chain_to_parameters(ctx, grads, private, public)
    loop_public = [torch.zeros_like(p) for p in public]
    for i in range(5):
        out = model.losses(learner().unsqueeze(0), data.batch(torch.tensor([i])))
        assert float(out.losses[0].detach()) == pytest.approx(float(losses[i]), abs=1e-5)
        expected = torch.autograd.grad(out.losses[0], private + public)
        for got, want in zip(per_sample, expected[: len(private)], strict=True):
            assert float(want.abs().max()) > 1e-6  # not trivially zero
            torch.testing.assert_close(got[i], want, atol=1e-10, rtol=1e-9)
        for j, want in enumerate(expected[len(private) :]):
            loop_public[j] += want / 5
    for got, want in zip(public_grads, loop_public, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-9)


def test_dp_step_without_noise_or_clipping_equals_plain_step(llava, color_qa):
    data = encode_qa(llava, color_qa.train)
    config = TrainConfig(optimizer="sgd", lr=0.5, momentum=0.0, weight_decay=0.0,
                         scheduler="constant")
    learners = [DPFPLPrompt(4, 64, 3, rank=2, generator=torch.Generator().manual_seed(1))
                for _ in range(2)]
    plain = GenerativeTrainer(_model(llava, learners[0], color_qa.classnames), data, config, 1)
    dp = DPGenerativeTrainer(_model(llava, learners[1], color_qa.classnames), data, config, 1,
                             noise_multiplier=0.0, clip_norm=1e6, sample_rate=0.5,
                             expected_batch_size=6, accountant=Accountant("rdp"))
    idx = torch.arange(6)
    plain.train_step(idx, idx)
    dp.train_step(idx, idx)
    for name in ("global_ctx", "local_ctx"):
        torch.testing.assert_close(getattr(learners[0], name), getattr(learners[1], name),
                                   atol=1e-6, rtol=1e-5)
    assert dp.accountant.epsilon(1e-5) > 0 or dp.noise_multiplier == 0.0


def test_dp_step_clips_per_sample(llava, color_qa):
    data = encode_qa(llava, color_qa.train)
    learner = CoOpPrompt(4, 64, 3, shared=False, generator=torch.Generator().manual_seed(1))
    config = TrainConfig(optimizer="sgd", lr=1.0, momentum=0.0, weight_decay=0.0,
                         scheduler="constant")
    before = learner.ctx.detach().clone()
    dp = DPGenerativeTrainer(_model(llava, learner, color_qa.classnames), data, config, 1,
                             noise_multiplier=0.0, clip_norm=1e-3, sample_rate=0.5,
                             expected_batch_size=4, accountant=Accountant("rdp"))
    dp.train_step(torch.arange(4), torch.arange(4))
    # the mean of 4 clipped gradients, each of norm <= 1e-3, over an expected batch of 4
    assert float((learner.ctx - before).norm()) <= 1e-3 + 1e-7


# ----------------------------------------------------------------- generation
def test_greedy_generation_with_cache_equals_full_recompute(llava, color_qa):
    learner = CoOpPrompt(3, 64, 3, generator=torch.Generator().manual_seed(2))
    model = _model(llava, learner, color_qa.classnames, max_new_tokens=4)
    data = encode_qa(llava, color_qa.test.subset(np.arange(2)))
    batch = data.batch(torch.arange(2))
    generated = model.generate(learner(), batch)
    for i, ids in enumerate(generated):
        prefix = list(batch.question_ids[i])
        for token in ids:
            fixed = model._fixed(learner(), batch.image_embeds[i : i + 1])
            seq = llava.token_embedding(torch.tensor([prefix]))
            hidden, _ = llava.hidden_states(torch.cat([fixed, seq], 1))
            assert int(llava.lm_logits(hidden[:, -1]).argmax()) == token
            prefix.append(token)


def test_training_reduces_loss_and_evaluates(llava, color_qa):
    data = encode_qa(llava, color_qa.train)
    learner = CoOpPrompt(4, 64, 3, generator=torch.Generator().manual_seed(0))
    model = _model(llava, learner, color_qa.classnames, loss="ranking")
    trainer = GenerativeTrainer(model, data, TrainConfig(optimizer="adamw", lr=0.1,
                                                         scheduler="constant"), 20)
    first = model.evaluate(data, 32, generate=False)
    for _ in range(20):
        trainer.train_step(torch.arange(len(data)), data.labels)
    metrics = model.evaluate(data, 32)
    assert metrics["loss"] < first["loss"] - 0.3
    assert metrics["accuracy"] > first["accuracy"] and metrics["accuracy"] >= 0.8
    assert {"loss", "accuracy", "exact_match", "ranking_accuracy", "samples"} <= set(metrics)


def test_per_class_context_needs_ranking(llava, color_qa):
    with pytest.raises(PromptError, match="ranking"):
        _model(llava, HierarchicalPrompt(4, 64, 3), color_qa.classnames)


def test_bf16_autocast_runs_on_cpu(color_qa):
    bf16 = LlavaBackbone.from_preset("llava-tiny", precision="bf16")
    fp32 = LlavaBackbone.from_preset("llava-tiny")
    learner = CoOpPrompt(4, 64, 3)
    losses = []
    for backbone in (bf16, fp32):
        data = encode_qa(backbone, color_qa.test)
        model = _model(backbone, learner, color_qa.classnames)
        losses.append(model.evaluate(data, 8, generate=False)["loss"])
    assert np.isfinite(losses[0]) and abs(losses[0] - losses[1]) < 0.1


# ------------------------------------------------------------------ JSONL data
def _write_vqa(root: Path, n: int = 12) -> Path:
    pixels, labels = coloured_squares(n, seed=5)
    (root / "images").mkdir(parents=True)
    lines = []
    for i, (px, y) in enumerate(zip(pixels, labels, strict=True)):
        Image.fromarray(px).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png",
                                 "question": "which color is the square?",
                                 "answer": list(COLORS)[y]}))
    (root / "train.jsonl").write_text("\n".join(lines[: n * 2 // 3]) + "\n")
    (root / "test.jsonl").write_text("\n".join(lines[n * 2 // 3 :]) + "\n\n")
    return root


def test_jsonl_dataset_and_answer_task(tmp_path, llava):
    root = _write_vqa(tmp_path / "vqa")
    splits = jsonl_qa(root)
    assert len(splits.train) == 8 and len(splits.test) == 4
    assert splits.classnames == sorted(COLORS)
    data = encode_qa(llava, splits.train)
    model = _model(llava, CoOpPrompt(4, 64, 1), [], kind="answer")
    metrics = model.evaluate(data, 4)
    assert metrics["accuracy"] == metrics["exact_match"] and "ranking_accuracy" not in metrics


def test_jsonl_errors_name_file_and_line(tmp_path):
    root = _write_vqa(tmp_path / "vqa")
    (root / "test.jsonl").write_text('{"image": "images/0.png", "question": "q"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: missing .*answer"):
        jsonl_qa(root)
    (root / "test.jsonl").write_text('{"image": "nope.png", "question": "q", "answer": "a"}\n')
    with pytest.raises(DataError, match=r"test.jsonl:1: image .*nope.png does not exist"):
        jsonl_qa(root)
    with pytest.raises(DataError, match="neither train.jsonl"):
        jsonl_qa(tmp_path)


# ------------------------------------------------------------ portable prompts
def test_portable_prompt_round_trip_llava(tmp_path, llava, color_qa):
    learner = DPFPLPrompt(4, 64, 3, rank=2, residual=False,
                          generator=torch.Generator().manual_seed(4))
    model = _model(llava, learner, color_qa.classnames)
    data = encode_qa(llava, color_qa.test)
    batch = data.batch(torch.arange(len(data)))
    expected = model.class_scores(learner().unsqueeze(0).expand(len(data), -1, -1, -1), batch)
    folder = export_prompt(tmp_path / "p", learner, llava, task=TaskConfig().model_dump(),
                           classnames=color_qa.classnames,
                           privacy={"epsilon": 2.0, "delta": 1e-5, "accountant": "rdp"},
                           data_description="synthetic colours, 18 images")
    meta = json.loads((folder / "prompt.json").read_text())
    assert meta["prompt"]["personal"] == ["local_ctx"] and meta["privacy"]["epsilon"] == 2.0
    loaded = load_prompt(folder, llava)
    rebuilt = loaded.build_learner(llava)
    again = _model(llava, rebuilt, color_qa.classnames)
    got = again.class_scores(rebuilt().unsqueeze(0).expand(len(data), -1, -1, -1), batch)
    assert torch.equal(got, expected)
    assert torch.equal(loaded.context, learner().detach())


def test_portable_prompt_rejects_other_backbones(tmp_path, llava):
    folder = export_prompt(tmp_path / "p", CoOpPrompt(4, 64, 3), llava)
    small = LlavaBackbone.from_preset("llava-small")
    with pytest.raises(PromptCompatibilityError, match="different configuration"):
        load_prompt(folder, small)
    other_seed = LlavaBackbone.from_preset("llava-tiny", weights_seed=7)
    with pytest.raises(PromptCompatibilityError, match="weights differ"):
        load_prompt(folder, other_seed)
    load_prompt(folder, other_seed, check_weights=False)
    (folder / "prompt.json").write_text(
        (folder / "prompt.json").read_text().replace('"tensors_sha256": "', '"tensors_sha256": "0'))
    with pytest.raises(PromptError, match="does not match"):
        load_prompt(folder)


def test_portable_prompt_round_trip_clip(tmp_path, tiny_backbone):
    from fedprompt.training.model import PromptedClassifier

    learner = DPFPLPrompt(4, tiny_backbone.ctx_dim, 3, rank=2,
                          generator=torch.Generator().manual_seed(0))
    names = ["cat", "dog", "bird"]
    features = torch.randn(5, tiny_backbone.embed_dim, generator=torch.Generator().manual_seed(1))
    expected = PromptedClassifier(tiny_backbone, learner, names)(features)
    folder = export_prompt(tmp_path / "clip", learner, tiny_backbone, classnames=names,
                           task={"kind": "classify", "template": "X X X X {class}."})
    rebuilt = load_prompt(folder, tiny_backbone).build_learner(tiny_backbone)
    assert torch.equal(PromptedClassifier(tiny_backbone, rebuilt, names)(features), expected)
    with pytest.raises(PromptCompatibilityError, match="llava"):
        load_prompt(folder, LlavaBackbone.from_preset("llava-tiny"))
    shared_only = export_prompt(tmp_path / "shared", learner, tiny_backbone,
                                include_personal=False)
    with pytest.raises(PromptError, match="no personal tensors"):
        load_prompt(shared_only).build_learner(tiny_backbone)


# ------------------------------------------------------------------ federated
def test_generative_client_rounds_with_local_dp():
    from fedprompt.federated.generative import open_client_session

    config = RunConfig().with_overrides({
        "backbone.model": "llava-tiny", "data.num_clients": 3, "data.max_train_per_class": 4,
        "federation.method": "dpfpl", "federation.rounds": 2, "prompt.n_ctx": 4,
        "prompt.rank": 2, "train.batch_size": 8, "privacy.mode": "noise-multiplier",
        "privacy.local_noise_multiplier": 1.0, "privacy.epsilon": 100.0,
        "privacy.server": False, "privacy.reproducible_noise": True,
    })
    session = open_client_session(config, 1, 3)
    shared = session.learner.shared_state()
    first = session.train(shared, None, 1)
    assert set(first.update) == {"global_ctx"} and first.metrics["epsilon"] > 0
    second = session.train(shared, first.state, 2)
    assert second.metrics["epsilon"] > first.metrics["epsilon"]
    assert set(second.state.personal) == {"local_ctx"}
    metrics = session.evaluate(shared, second.state)
    assert {"local-accuracy", "local-exact-match", "neighbor-accuracy"} <= set(metrics)


def test_answer_task_from_run_config(tmp_path):
    from fedprompt.federated.generative import GenerativeClientSession, open_client_session

    root = _write_vqa(tmp_path / "vqa", n=18)
    config = RunConfig().with_overrides({
        "backbone.model": "llava-tiny", "task.kind": "answer",
        "task.prompt_position": "after-image", "data.dataset": str(root),
        "data.partition": "iid", "data.num_clients": 2, "federation.method": "promptfl",
        "prompt.n_ctx": 2, "train.batch_size": 4, "federation.rounds": 1,
    })
    session = open_client_session(config, 0, 2)
    assert isinstance(session, GenerativeClientSession) and session.model.task.kind == "answer"
    outcome = session.train(session.learner.shared_state(), None, 1)
    assert set(outcome.update) == {"ctx"} and outcome.metrics["steps"] >= 1
    metrics = session.evaluate(session.learner.shared_state(), outcome.state)
    assert metrics["local-accuracy"] == metrics["local-exact-match"]
