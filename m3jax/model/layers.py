"""Stateless building blocks: RMSNorm, rotary position embedding, gated SiLU MLP."""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def rms_norm(x_BTD: Array, scale_D: Array, eps: float) -> Array:
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_angles(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """cos, sin of shape positions.shape + (head_dim,) in the "rotate_half" (HF Llama) layout."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
    """Rotate pairs (i, i + H/2) of every head by the position angle; heads share the angles."""
    x = x_BTNH.astype(jnp.float32)
    h = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    cos, sin = cos_BTH[..., None, :], sin_BTH[..., None, :]
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)


def mlp(x_BTD: Array, w_gate_DF: Array, w_up_DF: Array, w_down_FD: Array) -> Array:
    """down(silu(gate(x)) * up(x)), no bias."""
    gate = jnp.einsum("BTD,DF->BTF", x_BTD, w_gate_DF)
    up = jnp.einsum("BTD,DF->BTF", x_BTD, w_up_DF)
    return jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)
