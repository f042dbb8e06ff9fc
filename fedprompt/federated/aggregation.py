"""Server-side aggregation of shared-tensor updates, with global DP.

Every reply is validated first (expected keys, shapes, float dtype, finite values, a
sanity bound on the norm); an invalid reply is rejected with a reason and never touches
the model. With global DP, each client's update is clipped to ``C_G`` (L2 over all shared
tensors together), the clipped updates are averaged **with equal weights** over the
expected number of participants ``n = q N`` (a fixed denominator, so one client's
contribution to the average is at most ``C_G / n`` whoever else takes part), and
Gaussian noise ``N(0, (z C_G / n)^2)`` is added to that average. The clipped updates are
summed in float64 and the noise is float64 from a CSPRNG stream
(:class:`~fedprompt.privacy.noise.SecureRandom`, keyed from the OS) unless reproducible
noise was asked for; the result is cast to float32 after the noise is in. (Flower's DP
wrappers calibrate ``z C / n`` for an unweighted mean but apply it to FedAvg's
example-weighted mean; we do not inherit that.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedprompt.errors import FedPromptError
from fedprompt.privacy.noise import SecureRandom


class UpdateRejected(FedPromptError):
    """A client's reply is not a valid update; the message says why."""


def update_norm(update: Mapping[str, Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in update.values())))


def validate_update(update: Mapping[str, np.ndarray | Tensor],
                    expected: Mapping[str, tuple[int, ...]], max_norm: float) -> dict[
    str, Tensor
]:
    """The update as float32 tensors, or :class:`UpdateRejected` naming the problem."""
    if set(update) != set(expected):
        missing = sorted(set(expected) - set(update))
        extra = sorted(set(update) - set(expected))
        raise UpdateRejected(f"wrong keys (missing {missing}, unexpected {extra})")
    checked = {}
    for name, shape in expected.items():
        value = update[name]
        array = value.detach().cpu() if isinstance(value, Tensor) else torch.from_numpy(
            np.asarray(value))
        if not array.dtype.is_floating_point:
            raise UpdateRejected(f"{name!r} has dtype {array.dtype}, expected a float tensor")
        if tuple(array.shape) != tuple(shape):
            raise UpdateRejected(f"{name!r} has shape {tuple(array.shape)}, expected "
                                 f"{tuple(shape)}")
        if not torch.isfinite(array).all():
            raise UpdateRejected(f"{name!r} has non-finite values")
        checked[name] = array.float()
    norm = update_norm(checked)
    if norm > max_norm:
        # the reason names the bound, not the client's norm: rejection reasons land in the
        # results and logs, and a client's norm is covered by no user-level epsilon
        raise UpdateRejected("the update's norm exceeds the sanity bound "
                             f"federation.max_update_norm={max_norm:g}")
    return checked


def clip_update(update: Mapping[str, Tensor], clip_norm: float) -> tuple[dict[str, Tensor],
                                                                           float]:
    """Scale the whole update to L2 norm at most ``clip_norm``; returns it and the norm
    before clipping."""
    norm = update_norm(update)
    scale = min(1.0, clip_norm / (norm + 1e-12))
    return {k: v * scale for k, v in update.items()}, norm


def noise_generator(reproducible_seed: int | None = None) -> SecureRandom:
    """The server's noise stream: keyed from the OS's CSPRNG, or reproducible from
    ``reproducible_seed`` (tests)."""
    if reproducible_seed is None:
        return SecureRandom()
    return SecureRandom.from_seed("server-noise", reproducible_seed)


@dataclass
class Aggregate:
    update: dict[str, Tensor]
    clipped: int  # how many updates were scaled down
    norms: list[float]  # update norms before clipping
    noise_std: float  # per coordinate, on the average


def average_updates(updates: Sequence[Mapping[str, Tensor]], template: Mapping[str, Tensor],
                    weights: Sequence[float] | None = None) -> dict[str, Tensor]:
    """Plain (or weighted) mean; zeros like ``template`` when there is nothing to average."""
    if not updates:
        return {k: torch.zeros_like(v) for k, v in template.items()}
    w = np.ones(len(updates)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    return {k: sum(float(wi) * u[k] for wi, u in zip(w, updates, strict=True))
            for k in template}


def dp_average(updates: Sequence[Mapping[str, Tensor]], template: Mapping[str, Tensor],
               clip_norm: float, noise_multiplier: float, denominator: float,
               generator: SecureRandom) -> Aggregate:
    """Clip each update to ``clip_norm``, sum (float64), divide by the fixed
    ``denominator`` (the expected number of participants) and add float64
    ``N(0, (z clip_norm / denominator)^2)`` from ``generator``."""
    if denominator <= 0:
        raise ValueError("denominator must be positive")
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in template.items()}
    norms, clipped = [], 0
    for update in updates:
        scaled, norm = clip_update(update, clip_norm)
        norms.append(norm)
        clipped += norm > clip_norm
        for k in total:
            total[k] += scaled[k].double()
    std = noise_multiplier * clip_norm / denominator
    noisy = {k: (v / denominator + generator.normal(v.shape, std)).to(template[k].dtype)
             for k, v in total.items()}
    return Aggregate(noisy, clipped, norms, std)


@dataclass(frozen=True)
class GlobalDP:
    """Server-side DP settings of one aggregate: clip ``C_G`` and noise multiplier ``z``."""

    clip_norm: float
    noise_multiplier: float


def combine_updates(updates: Sequence[Mapping[str, Tensor]], weights: Sequence[float],
                    template: Mapping[str, Tensor], *, dp: GlobalDP | None,
                    denominator: float, equal_weights: bool,
                    generator: SecureRandom) -> tuple[dict[str, Tensor], dict[str, object]]:
    """The mean update of one group of clients (all of them, or one cluster) and what to
    record about it: with ``dp``, :func:`dp_average` over the fixed ``denominator`` (the
    expected number of participants of the group); without, the plain or example-weighted
    mean of the accepted updates."""
    if dp is not None:
        result = dp_average(updates, template, dp.clip_norm, dp.noise_multiplier,
                            denominator=denominator, generator=generator)
        return result.update, {"clipped": result.clipped, "noise_std": result.noise_std,
                               "update_norms": result.norms}
    mean = average_updates(updates, template, None if equal_weights else weights)
    return mean, {}
