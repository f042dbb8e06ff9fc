"""The offline pretrained dual encoder (EfficientNet-Lite0 + MiniLM, aligned via ImageNet)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedprompt.backbones import build_backbone
from fedprompt.backbones.dual_encoder import ALIGNMENT_TEMPLATE, _mean_pool
from fedprompt.backbones.efficientnet_lite import imagenet_classnames
from fedprompt.config import BackboneConfig
from fedprompt.data import encode_image_set, image_folder
from fedprompt.errors import BackboneError
from tests.conftest import shared_dataset


@pytest.fixture(scope="module")
def dual():
    return build_backbone(BackboneConfig(model="effnet-minilm", image_size=128, device="cpu"))


def test_imagenet_head_loads_strictly_and_has_the_standard_labels(dual) -> None:
    names = imagenet_classnames()
    assert len(names) == 1000 and names[0] == "tench" and names[985] == "daisy"
    assert sum(p.numel() for p in dual.image_model.parameters()) == 4_652_008


def test_prompt_path_equals_sentence_embedding_of_the_same_text(dual) -> None:
    names = ["daisy", "golden retriever", "airliner"]
    tokens = dual.tokenize_class_prompts(names, n_ctx=3)
    ctx = tokens.embeddings[0, 1:4]  # the placeholders' own embeddings
    ours = dual.encode_class_prompts(ctx, tokens)
    batch = dual.tokenizer([f"X X X {n}." for n in names], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = dual.text_model(**batch).last_hidden_state
    pooled = F.normalize(_mean_pool(hidden, batch["attention_mask"]), dim=-1)
    ref = (pooled - dual.text_mean) @ dual.projection
    assert torch.allclose(ours, ref, atol=1e-5)


def test_alignment_points_imagenet_names_at_their_classifier_rows(dual) -> None:
    names = imagenet_classnames()
    tokens = dual.tokenize_class_prompts(names, n_ctx=4)
    ctx = dual.embed_text("a photo of a")
    assert ALIGNMENT_TEMPLATE == "a photo of a {}."
    with torch.no_grad():
        text = F.normalize(dual.encode_class_prompts(ctx, tokens), dim=-1)
    rows = F.normalize(dual.image_model._fc.weight, dim=-1)
    top1 = (text @ rows.T).argmax(dim=1) == torch.arange(1000)
    assert top1.float().mean() > 0.5  # a linear map from 384-d text cannot fit all 1000 rows


def test_pretrained_image_tower_recognises_daisies() -> None:
    root = shared_dataset("flowers12")
    backbone = build_backbone(BackboneConfig(model="effnet-minilm", image_size=224))
    splits = image_folder(root)
    daisy = splits.test.subset(np.flatnonzero(
        splits.test.labels == splits.classnames.index("daisy")))
    pixels = backbone.preprocess([daisy.images.load(i) for i in range(len(daisy))])
    with torch.no_grad():
        predicted = backbone.image_model(pixels).argmax(dim=1)
    assert (predicted == imagenet_classnames().index("daisy")).float().mean() >= 0.5


def test_zero_shot_transfer_well_above_chance_on_cifar(dual) -> None:
    splits = image_folder(shared_dataset("cifar10-mini"))
    keep = np.concatenate([np.flatnonzero(splits.test.labels == c)[:20] for c in range(10)])
    test = splits.test.subset(keep)
    features = F.normalize(encode_image_set(dual, test.images), dim=-1)
    tokens = dual.tokenize_class_prompts(splits.classnames, n_ctx=4)
    with torch.no_grad():
        text = F.normalize(dual.encode_class_prompts(dual.embed_text("a photo of a"), tokens),
                           dim=-1)
    accuracy = ((features @ text.T).argmax(1).numpy() == test.labels).mean()
    assert accuracy > 0.3  # chance is 0.1


def test_image_size_is_only_for_the_dual_encoder() -> None:
    with pytest.raises(BackboneError, match="applies to effnet-minilm only"):
        build_backbone(BackboneConfig(model="clip-tiny", image_size=64))
