"""Noisy top-k gating while training, as one autograd function (Shazeer et al. 2017, Eq. 3-5).

``H(x) = x W_g (+ b_g) + N(0, 1) * Softplus(x W_noise (+ b_noise))``, then
``gates = Softmax(KeepTopK(H(x), k))``. The gradient of the gates reaches ``H`` at the k
chosen experts only, so the backward pass works on ``(B, k, N)`` values and one sparse
``(B, 2E, N)`` logit gradient, instead of autograd's chain of full-width steps (noise
product, softplus, top-k scatter, split) — about 4x less backward time at 3D token counts.
Inside, logits are expert-major ``(B, E, N)``: the top-k then runs elementwise over E
contiguous rows, and the router reads a feature map's tokens ``(B, C, N)`` without a copy.
For narrow float32 tokens on CPU the selection and the backward pass run in C
(:mod:`.native_router`): the same function, in one vectorised pass each.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .native_router import native_router_applies, router_backward, select_top_k


def _softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(1 + exp(x))`` as ``max(x, 0) - log(sigmoid(|x|))`` (``= log(1 + exp(-|x|))``):
    the same values (to fp32 rounding) about 5x faster than ``F.softplus`` on CPU, whose
    ``log1p`` is not vectorised; sigmoid is ~7x cheaper than exp, so 1.5 -> 1.0 ms at
    524k values against ``log(1 + exp(-|x|))``."""
    return x.clamp_min(0).sub_(x.abs().sigmoid_().log_())  # two temporaries


class _Softplus(torch.autograd.Function):
    """:func:`_softplus` with gradient ``sigmoid(x)``."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return _softplus(x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """``F.softplus(x)`` (beta 1), faster on CPU (see :func:`_softplus`)."""
    return _Softplus.apply(x)


def softmax_top(top: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Softmax over the last axis, in float32 for half-precision ``top``, returned as
    ``dtype``; for two values as ``sigmoid`` of their difference (the same function, ~10x
    faster than a softmax over an axis of length 2 on CPU)."""
    if top.dtype in (torch.float16, torch.bfloat16):
        top = top.float()
    if top.shape[-1] != 2:
        return torch.softmax(top, dim=-1).to(dtype)
    diff = top[..., :1] - top[..., 1:]
    return torch.cat([torch.sigmoid(diff), torch.sigmoid(-diff)], dim=-1).to(dtype)


ELEMENTWISE_MIN_TOKENS = 4096
"""Below this many tokens :func:`top_k_experts` calls ``torch.topk``."""


def top_k_experts(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest logits per token and their experts, best first, in expert-major
    layout: ``logits (B, E, N)`` → values and long indices ``(B, k, N)``.

    float32 (and float16/bfloat16, compared as float32) with ``k <= 2`` and at least
    ``ELEMENTWISE_MIN_TOKENS`` tokens: a running top-2 by elementwise max/min over the E rows
    of exact integer keys (the float's order-preserving int32 image, shifted left by
    ``s = bits(E - 1)`` and or-ed with ``2**s - 1 - e``, in int64), about 2.5x faster than
    ``torch.topk`` over an axis of 8 on CPU; shifts and masks, not products and remainders
    (3-6x faster on int64). Same selection and order as ``topk`` wherever the values
    differ; equal values go to the lower expert index. Otherwise ``torch.topk`` (one op
    instead of ~30: faster for few tokens).
    """
    B, E, N = logits.shape
    if (k > 2 or logits.dtype == torch.float64 or not logits.is_floating_point()
            or B * N < ELEMENTWISE_MIN_TOKENS):
        values, indices = logits.topk(k, dim=1)
        return values, indices
    bits = logits.float().contiguous().view(torch.int32)
    key = (bits >> 31).bitwise_and_(0x7FFFFFFF).bitwise_xor_(bits)  # negative: flip magnitude
    shift = max(1, (E - 1).bit_length())
    low = 2**shift - 1  # the expert's bits: low - e, so the lower index wins a tie
    tie_break = torch.arange(low, low - E, -1, device=logits.device).view(1, E, 1)
    key = key.to(torch.int64).bitwise_left_shift_(shift).bitwise_or_(tie_break)  # unique
    first = key[:, 0]
    second = torch.full_like(first, torch.iinfo(torch.int64).min)
    for e in range(1, E):
        row = key[:, e]
        if k == 2:
            second = torch.maximum(second, torch.minimum(first, row))
        first = torch.maximum(first, row)
    best = [first, second][:k]
    indices = torch.stack([b.bitwise_and_(low).bitwise_xor_(low) for b in best], 1)  # (B, k, N)
    return logits.gather(1, indices), indices


class _NoisyTopK(torch.autograd.Function):
    """Expert-major inside ((B, E, N): per-expert rows are contiguous, so the top-k runs
    elementwise); token-major ``(B, N, k)`` outside."""

    @staticmethod
    def forward(ctx, x, weight, bias, k, noise):
        E = weight.shape[-1] // 2
        both = torch.bmm(weight.transpose(1, 2), x.transpose(1, 2))  # (B, 2E, N)
        if bias is not None:
            both += bias[:, :, None]
        clean, noise_logits = both.split(E, dim=1)
        noise = torch.randn_like(clean) if noise is None else noise.transpose(1, 2).to(clean)
        logits = torch.addcmul(clean, noise, _softplus(noise_logits))
        ctx.has_bias = bias is not None
        # logits in float32 (under autocast the product may be half precision)
        ctx.native = logits.dtype == torch.float32 and native_router_applies(x, weight, k)
        if ctx.native:  # selection and backward pass in C (see native_router)
            indices, top, noise_sel, nl_sel = select_top_k(logits, noise, both, k)
            gates = softmax_top(top, x.dtype)  # (B, N, k)
            ctx.save_for_backward(x, weight, indices, gates, noise_sel, nl_sel)
            ctx.mark_non_differentiable(indices)
            return indices, gates
        top, indices = top_k_experts(logits, k)  # (B, k, N)
        gates = softmax_top(top.transpose(1, 2), x.dtype)  # (B, N, k)
        ctx.save_for_backward(x, weight, indices, gates, noise.gather(1, indices),
                              noise_logits.gather(1, indices))
        indices = indices.transpose(1, 2).contiguous()
        ctx.mark_non_differentiable(indices)
        return indices, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, _, grad_gates):
        x, weight, indices, gates, noise, noise_logits = ctx.saved_tensors
        if ctx.native:
            grad_x, grad_w, grad_b = router_backward(
                grad_gates.to(gates.dtype), gates, indices, noise, noise_logits, x, weight,
                need_x=ctx.needs_input_grad[0],
                need_bias=ctx.has_bias and ctx.needs_input_grad[2])
            return grad_x, grad_w if ctx.needs_input_grad[1] else None, grad_b, None, None
        E = weight.shape[-1] // 2
        grad_gates = grad_gates.to(gates.dtype)
        # softmax backward, then d logits at the chosen experts (zero elsewhere), (B, k, N)
        grad_top = gates * (grad_gates - (gates * grad_gates).sum(-1, keepdim=True))
        grad_top = grad_top.transpose(1, 2).to(noise.dtype)
        grad_noise_logits = grad_top * noise * torch.sigmoid(noise_logits)
        grad_both = x.new_zeros(x.shape[0], 2 * E, x.shape[1], dtype=grad_top.dtype)
        grad_both.scatter_(1, indices, grad_top)
        grad_both.scatter_(1, indices + E, grad_noise_logits)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # (B, C, 2E) @ (B, 2E, N), returned as (B, N, C): 5x
            # faster than the token-major product, and the layout of a feature map's tokens
            grad_x = torch.bmm(weight.to(grad_both), grad_both).transpose(1, 2)
        if ctx.needs_input_grad[1]:  # (B, C, N) @ (B, N, 2E)
            grad_w = torch.bmm(x.transpose(1, 2).to(grad_both), grad_both.transpose(1, 2))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_both.sum(2)
        return (None if grad_x is None else grad_x.to(x.dtype),
                None if grad_w is None else grad_w.to(weight.dtype), grad_b, None, None)


def noisy_top_k(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy top-k routing of tokens by per-sample routers.

    Args:
        x: tokens ``(B, N, C)``.
        weight: each sample's gate and noise weights side by side ``(B, C, 2E)``.
        bias: their biases ``(B, 2E)``, or None.
        k: experts kept per token.
        noise: standard normal draws ``(B, N, E)`` to use (tests replay them); None = fresh
            draws from the default generator.

    Returns:
        ``indices`` ``(B, N, k)`` (best first, long) and ``gates`` ``(B, N, k)`` (their
        softmax weights); gradients flow to ``x``, ``weight`` and ``bias`` through the gates.
    """
    return _NoisyTopK.apply(x, weight, bias, k, noise)
