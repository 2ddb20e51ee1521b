"""Set-level losses (model.md §10). Every loss maps pred [B,S,D], target [B,S',D] to one value per
set ([B]); the training loss is the NaN-ignoring mean over sets (``nanmean``).

Optional key-padding masks ([B,S] bool, True = real cell) give padded cells weight 0 and spread
uniform weights over the real ones (a statetx extension).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from statetx._utils import (
    LOSS_OPTION_ALIASES,
    SET_LOSS_OPTIONS,
    TRAINING_LOSS_OPTIONS,
    did_you_mean,
    matmul_precision_scope,
)
from statetx.errors import ConfigError, DataError

LOSS_NAMES = ("energy", "sinkhorn", "mse", "se")


@contextmanager
def full_fp32_matmul() -> Iterator[None]:
    """Run fp32 matrix products at full precision inside the block.

    Training sets ``torch.set_float32_matmul_precision("medium")`` (reference parity), which lets
    CPUs with AMX use bf16 and GPUs TF32. The set losses expand ‖a − b‖² = ‖a‖² − 2a·b + ‖b‖²,
    which cancels catastrophically at that precision (the energy of a 0.05 log-unit shift was
    off by ~20 % on a 1,267-gene set), so they always run at "highest".
    """
    if torch.compiler.is_compiling():  # traced once: the caller sets "highest" (see Trainer)
        yield
        return
    with matmul_precision_scope("highest"):
        yield


def _as_batched(x: Tensor) -> Tensor:
    if x.dim() == 2:
        return x.unsqueeze(0)
    if x.dim() != 3:
        raise DataError(f"set losses need [B, S, D] (or [S, D]) tensors, got {tuple(x.shape)}.")
    return x


def _weights(mask: Tensor | None, b: int, n: int, like: Tensor) -> Tensor:
    """Uniform probability weights [B, n], zero at masked positions."""
    if mask is None:
        return like.new_full((b, n), 1.0 / n)
    m = mask.reshape(b, n).to(like.dtype)
    return m / m.sum(dim=1, keepdim=True)


def _zero_masked(x: Tensor, mask: Tensor | None) -> Tensor:
    return x if mask is None else x.masked_fill(~mask.reshape(x.shape[:2])[..., None], 0.0)


class _ExactBmm(torch.autograd.Function):
    """``x @ yᵀ`` whose forward and backward both run at full fp32 matmul precision.

    The backward computes only the gradients that are needed (the target side of a set loss
    has none)."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, y)
        with full_fp32_matmul():
            return x @ y.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x, y = ctx.saved_tensors
        with full_fp32_matmul():
            gx = grad @ y if ctx.needs_input_grad[0] else None
            gy = grad.transpose(1, 2) @ x if ctx.needs_input_grad[1] else None
        return gx, gy


class _ExactGram(torch.autograd.Function):
    """``x @ xᵀ`` at full fp32 precision; the backward is one product, (G + Gᵀ) x."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        with full_fp32_matmul():
            return x @ x.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        with full_fp32_matmul():
            return (grad + grad.transpose(1, 2)) @ x


def _sq_dists(x: Tensor, y: Tensor | None = None) -> Tensor:
    """‖x‖² − 2 x·y + ‖y‖² through expanded norms (not the difference vector), [B, n, m];
    ``y=None``: x to itself (a Gram matrix with a one-product backward).

    The product runs at full precision even when training lowered the fp32 matmul precision
    (see :func:`full_fp32_matmul`)."""
    nx = (x * x).sum(-1)
    if y is None:
        return nx[:, :, None] - 2.0 * _ExactGram.apply(x) + nx[:, None, :]
    return nx[:, :, None] - 2.0 * _ExactBmm.apply(x, y) + (y * y).sum(-1)[:, None, :]


# --------------------------------------------------------------------------------------------
# Energy distance
# --------------------------------------------------------------------------------------------


def _dists(x: Tensor, y: Tensor | None = None) -> Tensor:
    """Euclidean distances sqrt(max(‖x‖² − 2 x·y + ‖y‖², 1e-8)), [B, n, m]; ``y=None``: x to x."""
    return _sq_dists(x, y).clamp_min(1e-8).sqrt()


def energy_distance(x: Tensor, y: Tensor, mask_x: Tensor | None = None,
                    mask_y: Tensor | None = None) -> Tensor:
    """Half energy distance per set (V-statistic), as geomloss ``SamplesLoss("energy")``.

    E = Σᵢⱼ aᵢbⱼ d(xᵢ,yⱼ) − ½ Σᵢᵢ' aᵢaᵢ' d(xᵢ,xᵢ') − ½ Σⱼⱼ' bⱼbⱼ' d(yⱼ,yⱼ') with
    d(u,v) = sqrt(max(‖u‖² − 2u·v + ‖v‖², 1e-8)) and uniform weights a, b. Both sets are first
    centred on the target's mean (distances do not change; the expanded norms cancel less), and
    the three blocks are computed separately so that the backward pass only differentiates what
    depends on ``x`` (the target block has no gradient).
    """
    x, y = _as_batched(x), _as_batched(y)
    if x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise DataError(f"energy_distance: shapes {tuple(x.shape)} and {tuple(y.shape)} differ "
                        "in batch size or feature width.")
    b, n, _ = x.shape
    a_w, b_w = _weights(mask_x, b, n, x), _weights(mask_y, b, y.shape[1], y)
    x, y = _zero_masked(x, mask_x), _zero_masked(y, mask_y)
    centre = (b_w[..., None] * y).sum(1, keepdim=True).detach()
    x, y = x - centre, y - centre
    with full_fp32_matmul():
        cross = torch.einsum("bi,bij,bj->b", a_w, _dists(x, y), b_w)
        self_x = torch.einsum("bi,bij,bj->b", a_w, _dists(x), a_w)
        self_y = torch.einsum("bi,bij,bj->b", b_w, _dists(y), b_w)
    return cross - 0.5 * (self_x + self_y)


# --------------------------------------------------------------------------------------------
# Debiased Sinkhorn divergence (log domain, epsilon annealing)
# --------------------------------------------------------------------------------------------


def _softmin(eps: float, cost: Tensor, h: Tensor) -> Tensor:
    """−ε log Σⱼ exp(hⱼ − Cᵢⱼ/ε), [B, n]."""
    return -eps * torch.logsumexp(h[:, None, :] - cost / eps, dim=2)


def epsilon_schedule(diameter: float, blur: float, scaling: float, p: int = 2) -> list[float]:
    """ε values from diameter^p down to blur^p, geometric with ratio scaling^p."""
    eps = [diameter**p]
    if diameter > 0 and blur > 0:
        e, stop, step = p * math.log(diameter), p * math.log(blur), p * math.log(scaling)
        while e > stop:
            eps.append(math.exp(e))
            e += step
    eps.append(blur**p)
    return eps


def sinkhorn_divergence(x: Tensor, y: Tensor, mask_x: Tensor | None = None,
                        mask_y: Tensor | None = None, *, blur: float = 0.05,
                        scaling: float = 0.5) -> Tensor:
    """Debiased Sinkhorn divergence S = OT(α,β) − ½OT(α,α) − ½OT(β,β), per set.

    p = 2, cost ½‖x−y‖², ε = blur², ε annealed from the squared diameter of all points by the
    factor scaling² per step; symmetric (averaged) log-domain updates without gradient, then one
    final extrapolation step with gradient (envelope theorem); cost matrices are built with the
    second point cloud detached, so the gradient is the transport-plan gradient of geomloss.
    """
    x, y = _as_batched(x), _as_batched(y)
    b, n, _ = x.shape
    m = y.shape[1]
    a_w, b_w = _weights(mask_x, b, n, x), _weights(mask_y, b, m, y)
    a_log, b_log = a_w.log(), b_w.log()
    x0, y0 = _zero_masked(x, mask_x), _zero_masked(y, mask_y)
    # the second argument is detached: each potential carries the gradient of its own points
    c_xy, c_yx = _sq_dists(x0, y0.detach()) / 2, _sq_dists(y0, x0.detach()) / 2
    c_xx, c_yy = _sq_dists(x0, x0.detach()) / 2, _sq_dists(y0, y0.detach()) / 2

    with torch.no_grad():
        pts = torch.cat([x0[a_w > 0], y0[b_w > 0]], dim=0)
        diameter = float((pts.max(0).values - pts.min(0).values).norm()) if len(pts) else 1.0
        eps_list = epsilon_schedule(max(diameter, 1e-12), blur, scaling)
        e = eps_list[0]
        f_ba, g_ab = _softmin(e, c_xy, b_log), _softmin(e, c_yx, a_log)
        f_aa, g_bb = _softmin(e, c_xx, a_log), _softmin(e, c_yy, b_log)
        for e in eps_list:
            ft_ba = _softmin(e, c_xy, b_log + g_ab / e)
            gt_ab = _softmin(e, c_yx, a_log + f_ba / e)
            ft_aa = _softmin(e, c_xx, a_log + f_aa / e)
            gt_bb = _softmin(e, c_yy, b_log + g_bb / e)
            f_ba, g_ab = (f_ba + ft_ba) / 2, (g_ab + gt_ab) / 2
            f_aa, g_bb = (f_aa + ft_aa) / 2, (g_bb + gt_bb) / 2
    e = eps_list[-1]
    f_ba, g_ab = (_softmin(e, c_xy, b_log + g_ab.detach() / e),
                  _softmin(e, c_yx, a_log + f_ba.detach() / e))
    f_aa = _softmin(e, c_xx, a_log + f_aa.detach() / e)
    g_bb = _softmin(e, c_yy, b_log + g_bb.detach() / e)
    return (a_w * (f_ba - f_aa)).sum(1) + (b_w * (g_ab - g_bb)).sum(1)


# --------------------------------------------------------------------------------------------
# MSE, combination, chunking
# --------------------------------------------------------------------------------------------


def mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-set mean squared error, cell i against cell i (order-dependent; an ablation)."""
    pred, target = _as_batched(pred), _as_batched(target)
    if pred.shape != target.shape:
        raise DataError(f"mse needs equal shapes, got {tuple(pred.shape)} and "
                        f"{tuple(target.shape)}.")
    sq = (pred - target).pow(2)
    if mask is None:
        return sq.mean(dim=(1, 2))
    m = mask.reshape(sq.shape[:2]).to(sq.dtype)
    return (sq * m[..., None]).sum(dim=(1, 2)) / (m.sum(1) * sq.shape[-1])


def nanmean(values: Tensor) -> Tensor:
    """Mean over sets ignoring NaN entries (NaN only if every entry is NaN)."""
    return torch.nanmean(values)


@dataclass
class SetLoss:
    """A configured set loss: ``loss(pred, target, mask=None, training=False) -> [B]``.

    ``mmd_num_chunks = k > 1`` splits the feature dimension into k near-equal chunks and averages
    the per-chunk losses; with ``randomize_mmd_chunks`` the features are randomly permuted first
    (only when called with ``training=True``).
    """

    name: str = "energy"
    blur: float = 0.05
    sinkhorn_weight: float = 0.01
    energy_weight: float = 1.0
    mmd_num_chunks: int = 1
    randomize_mmd_chunks: bool = False

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {self.name!r}.{did_you_mean(self.name, LOSS_NAMES)}"
                              f" Valid losses: {', '.join(LOSS_NAMES)}.")
        k = self.mmd_num_chunks
        if not isinstance(k, bool) and isinstance(k, numbers.Real) and float(k).is_integer():
            self.mmd_num_chunks = k = int(k)  # 2, 2.0, numpy integers
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"mmd_num_chunks must be an integer >= 1, got {k!r}.")
        if not (self.blur > 0 and math.isfinite(self.blur)):
            raise ConfigError(f"blur must be positive, got {self.blur!r}.")
        for key in ("sinkhorn_weight", "energy_weight"):
            w = getattr(self, key)
            if not (math.isfinite(w) and w >= 0):
                raise ConfigError(f"{key} must be a finite number >= 0, got {w!r}.")

    def _one(self, pred: Tensor, target: Tensor, mask: Tensor | None) -> Tensor:
        if self.name == "energy":
            return energy_distance(pred, target, mask, mask)
        if self.name == "sinkhorn":
            return sinkhorn_divergence(pred, target, mask, mask, blur=self.blur)
        if self.name == "mse":
            return mse(pred, target, mask)
        return (self.sinkhorn_weight * sinkhorn_divergence(pred, target, mask, mask, blur=self.blur)
                + self.energy_weight * energy_distance(pred, target, mask, mask))

    def __call__(self, pred: Tensor, target: Tensor, mask: Tensor | None = None,
                 training: bool = False) -> Tensor:
        k = self.mmd_num_chunks
        if k == 1:
            return self._one(pred, target, mask)
        if self.randomize_mmd_chunks and training:
            perm = torch.randperm(pred.shape[-1], device=pred.device)
            pred, target = pred[..., perm], target[..., perm]
        chunks = zip(torch.tensor_split(pred, k, dim=-1), torch.tensor_split(target, k, dim=-1))
        return torch.stack([self._one(p, t, mask) for p, t in chunks]).mean(0)


def get_loss(name: str, **options: object) -> Callable[..., Tensor]:
    """A set loss by name: ``energy`` (default), ``sinkhorn``, ``mse``, ``se``.

    Options: blur, sinkhorn_weight, energy_weight, mmd_num_chunks, randomize_mmd_chunks.
    """
    for k in options:
        if k not in SET_LOSS_OPTIONS:
            raise ConfigError(f"unknown loss option {k!r}.{did_you_mean(k, SET_LOSS_OPTIONS)} "
                              f"Valid options: {', '.join(SET_LOSS_OPTIONS)}.")
    return SetLoss(name=name, **options)  # type: ignore[arg-type]


def split_loss_kwargs(loss_kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """``loss_kwargs`` as :class:`~statetx.train.TrainConfig` fields: the set loss's options under
    ``loss_options``, the training-loss options as themselves; unknown keys are errors."""
    options: dict[str, Any] = {}
    out: dict[str, Any] = {"loss_options": options}
    valid = SET_LOSS_OPTIONS + TRAINING_LOSS_OPTIONS + tuple(LOSS_OPTION_ALIASES)
    for key, value in (loss_kwargs or {}).items():
        name = LOSS_OPTION_ALIASES.get(key, key)
        if name in SET_LOSS_OPTIONS:
            options[name] = value
        elif name in TRAINING_LOSS_OPTIONS:
            out[name] = value
        else:
            raise ConfigError(f"loss_kwargs: unknown option {key!r}.{did_you_mean(key, valid)} "
                              f"Valid options: {', '.join(valid)}.")
    for key in ("blur", "sinkhorn_weight", "energy_weight"):
        if key in options:
            try:
                options[key] = float(options[key])
            except (TypeError, ValueError):
                raise ConfigError(f"loss_kwargs: {key}={options[key]!r} is not a number.") \
                    from None
    return out
