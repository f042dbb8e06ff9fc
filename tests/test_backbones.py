import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedprompt.backbones import CLIPBackbone, build_backbone
from fedprompt.backbones.clip import preset_config
from fedprompt.config import BackboneConfig
from fedprompt.errors import BackboneError, PromptError


def _class_names(n: int) -> list[str]:
    words = ["red", "green", "blue", "small", "large", "round", "striped", "wild", "old", "tiny"]
    return [f"{words[i % 10]} {words[(i // 10) % 10]} thing {i}" for i in range(n)]


def test_text_path_matches_transformers(tiny_backbone: CLIPBackbone) -> None:
    """Our embeddings-level text encoder equals CLIPModel.get_text_features on real tokens
    (the X placeholders fed as their own embeddings), despite shorter padding."""
    names = ["cat", "sunflower", "great white shark"]
    tokens = tiny_backbone.tokenize_class_prompts(names, n_ctx=4)
    x_embedding = tokens.embeddings[0, 1:5]
    ours = tiny_backbone.encode_class_prompts(x_embedding, tokens)
    batch = tiny_backbone.tokenizer([f"X X X X {n}." for n in names], padding="max_length",
                                    max_length=77, return_tensors="pt")
    ref = tiny_backbone.model.get_text_features(input_ids=batch["input_ids"]).pooler_output
    assert torch.allclose(ours, ref, atol=1e-5)


def test_thousand_class_chunked_encoding_equals_unchunked(tiny_backbone: CLIPBackbone) -> None:
    names = _class_names(1000)
    tokens = tiny_backbone.tokenize_class_prompts(names, n_ctx=4)
    ctx = torch.randn(4, tiny_backbone.ctx_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        whole = tiny_backbone.encode_class_prompts(ctx * 0.02, tokens, chunk_size=1000)
        chunked = tiny_backbone.encode_class_prompts(ctx * 0.02, tokens, chunk_size=96)
    assert whole.shape == (1000, tiny_backbone.embed_dim)
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_checkpointed_chunks_give_the_same_gradient(tiny_backbone: CLIPBackbone) -> None:
    """Chunking + checkpointing is exact, so compare in float64: gradients of size ~60
    agree to ~1e-13 there, while float32 reductions in another order differ by ~1e-5
    (more than a fixed 1e-6 at 2 threads)."""
    double = copy.deepcopy(tiny_backbone)
    double.model.double()
    tokens = double.tokenize_class_prompts(_class_names(50), n_ctx=4)
    target = torch.randn(50, double.embed_dim, generator=torch.Generator().manual_seed(1))
    grads = []
    for chunk, checkpoint in [(50, False), (16, True)]:
        ctx = (torch.randn(50, 4, double.ctx_dim, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(2)) * 0.02).requires_grad_()
        out = double.encode_class_prompts(ctx, tokens, chunk_size=chunk, checkpoint=checkpoint)
        (out * target).sum().backward()
        grads.append(ctx.grad)
    assert grads[0].dtype == torch.float64 and grads[0].abs().max() > 1.0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)


def test_backbone_is_frozen(tiny_backbone: CLIPBackbone) -> None:
    assert not any(p.requires_grad for p in tiny_backbone.parameters())
    tiny_backbone.train()
    assert not tiny_backbone.model.training


def test_image_features_shape_and_determinism() -> None:
    a = CLIPBackbone.from_preset("clip-tiny", weights_seed=3)
    b = CLIPBackbone.from_preset("clip-tiny", weights_seed=3)
    c = CLIPBackbone.from_preset("clip-tiny", weights_seed=4)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
              for _ in range(3)]
    fa = a.encode_images(a.preprocess(images))
    assert fa.shape == (3, a.embed_dim)
    assert torch.equal(fa, b.encode_images(b.preprocess(images)))
    assert a.identity() == b.identity() and a.identity() != c.identity()


def test_bf16_autocast_runs_close_to_fp32() -> None:
    fp32 = CLIPBackbone.from_preset("clip-tiny")
    bf16 = CLIPBackbone.from_preset("clip-tiny", precision="bf16")
    tokens = fp32.tokenize_class_prompts(["cat", "dog"], 2)
    ctx = tokens.embeddings[0, 1:3]
    a, b = fp32.encode_class_prompts(ctx, tokens), bf16.encode_class_prompts(ctx, tokens)
    assert b.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99


def test_n_ctx_out_of_range_says_the_limit(tiny_backbone: CLIPBackbone) -> None:
    with pytest.raises(PromptError, match=r"n_ctx=80 is out of range.*at most 73"):
        tiny_backbone.tokenize_class_prompts(["cat"], n_ctx=80)


def test_context_of_wrong_shape_is_rejected(tiny_backbone: CLIPBackbone) -> None:
    tokens = tiny_backbone.tokenize_class_prompts(["cat", "dog"], n_ctx=4)
    with pytest.raises(PromptError, match="does not fit"):
        tiny_backbone.encode_class_prompts(torch.zeros(3, tiny_backbone.ctx_dim), tokens)


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="does not exist.*clip-tiny"):
        build_backbone(BackboneConfig(model=str(tmp_path / "no-such-clip")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(BackboneError, match="no config.json"):
        build_backbone(BackboneConfig(model=str(tmp_path / "empty")))


def test_unreachable_hub_id_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneError, match="download the checkpoint"):
        build_backbone(BackboneConfig(model="openai/clip-vit-base-patch16-not-cached"))


def test_from_pretrained_loads_a_local_checkpoint(tmp_path: Path,
                                                  tiny_backbone: CLIPBackbone) -> None:
    folder = tmp_path / "clip"
    tiny_backbone.model.save_pretrained(folder)
    tiny_backbone.tokenizer.save_pretrained(folder)
    tiny_backbone.image_processor.save_pretrained(folder)
    loaded = build_backbone(BackboneConfig(model=str(folder)))
    tokens = loaded.tokenize_class_prompts(["cat", "dog"], 2)
    ref_tokens = tiny_backbone.tokenize_class_prompts(["cat", "dog"], 2)
    assert torch.equal(tokens.input_ids, ref_tokens.input_ids)
    ctx = ref_tokens.embeddings[0, 1:3]
    assert torch.allclose(loaded.encode_class_prompts(ctx, tokens),
                          tiny_backbone.encode_class_prompts(ctx, ref_tokens), atol=1e-6)
    assert loaded.identity()["weights_sha256"] == tiny_backbone.identity()["weights_sha256"]
    # saving adds serialization details (architectures, dtype) to the live config; neither
    # the saved copy's identity nor a fresh preset's may differ because of them
    fresh = CLIPBackbone.from_preset("clip-tiny", weights_seed=0)
    assert loaded.identity()["config_sha256"] == fresh.identity()["config_sha256"]


def test_unknown_preset_and_device() -> None:
    with pytest.raises(BackboneError, match="unknown CLIP preset"):
        preset_config("clip-huge")
    with pytest.raises(BackboneError, match="unknown device"):
        build_backbone(BackboneConfig(device="tpu-ish"))
