"""Stateless building blocks: RMSNorm, rotary position embedding, gated SiLU MLP."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.config import ModelConfig
from m3jax.model.attention import target_platform

Array = jax.Array


def rms_norm(x_BTD: Array, scale_D: Array, eps: float) -> Array:
    """x / sqrt(mean(x^2) + eps) * scale, computed in float32, returned in x's dtype."""
    x = x_BTD.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return (y * scale_D.astype(jnp.float32)).astype(x_BTD.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """The H/2 rotary frequencies (float32) of `config`: theta^(-2i/H), rescaled for
    `rope_type="llama3"` (Llama 3.1+): wavelengths longer than original_max_len / low_freq_factor
    are slowed by `rope_factor`, shorter than original_max_len / high_freq_factor kept, and the
    band between interpolated smoothly; then divided by `rope_freq_factors` when given (llama.cpp's
    form of the same scaling)."""
    H = config.head_dim
    inv = 1.0 / config.rope_theta ** (np.arange(0, H, 2, dtype=np.float32) / np.float32(H))
    inv = inv.astype(np.float32)
    if config.rope_type == "llama3":
        lo, hi, old = config.rope_low_freq_factor, config.rope_high_freq_factor, config.rope_original_max_len
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > old / lo, inv / config.rope_factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        mixed = (1 - smooth) * scaled / config.rope_factor + smooth * scaled
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)
        inv = np.where(medium, mixed, scaled).astype(np.float32)
    elif config.rope_type != "default":
        raise ValueError(f"unknown rope_type {config.rope_type!r}")
    if config.rope_freq_factors is not None:
        inv = (inv / np.asarray(config.rope_freq_factors, np.float32)).astype(np.float32)
    return inv


def rope_angles(positions: Array, config: ModelConfig) -> tuple[Array, Array]:
    """cos, sin of shape positions.shape + (head_dim,) in the "rotate_half" (HF Llama) layout,
    with the frequencies of `rope_inv_freq(config)`."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    ang = positions.astype(jnp.float32)[..., None] * inv_freq  # [..., H/2]
    ang = jnp.concatenate([ang, ang], axis=-1)
    return jnp.cos(ang), jnp.sin(ang)


@functools.lru_cache(maxsize=32)
def rope_table(config: ModelConfig, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [slots, head_dim] (float32 numpy) of the positions `context_offset + slot` of a
    KV cache's slots (`rope_angles`, evaluated once, also when called while tracing). The cached
    path gathers its rows from these constants rather than evaluating cos / sin in the step
    (XLA:CPU fuses the transcendental into every use of the rotated q and k, once per layer)."""
    with jax.ensure_compile_time_eval():
        cos, sin = rope_angles(config.context_offset + jnp.arange(slots), config)
        return np.asarray(cos), np.asarray(sin)


def apply_rope(x_BTNH: Array, cos_BTH: Array, sin_BTH: Array) -> Array:
    """Rotate pairs (i, i + H/2) of every head by the position angle; heads share the angles."""
    x = x_BTNH.astype(jnp.float32)
    h = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    cos, sin = cos_BTH[..., None, :], sin_BTH[..., None, :]
    return (x * cos + rotated * sin).astype(x_BTNH.dtype)


def dense(spec: str, x: Array, w: Array) -> Array:
    """einsum(spec, x, w) of an activation and a weight (cast to x's dtype), result in x's dtype.
    With 16-bit activations on a CPU the product accumulates in float32 explicitly
    (`preferred_element_type`): XLA:CPU runs bf16 x bf16 -> f32 products natively (~2x its
    float32 products on this project's CPU) but converts both operands of a bf16 -> bf16
    product to float32 first. Elsewhere the plain einsum (TPU / GPU accumulate in float32)."""
    w = w.astype(x.dtype)
    if x.dtype.itemsize == 2 and target_platform() == "cpu":
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32).astype(x.dtype)
    return jnp.einsum(spec, x, w)


def mlp(x_BTD: Array, w_gate_DF: Array, w_up_DF: Array, w_down_FD: Array) -> Array:
    """down(silu(gate(x)) * up(x)), no bias; weights cast to x's dtype (`dense`)."""
    gate = dense("BTD,DF->BTF", x_BTD, w_gate_DF)
    up = dense("BTD,DF->BTF", x_BTD, w_up_DF)
    return dense("BTF,FD->BTD", jax.nn.silu(gate) * up, w_down_FD)


def fused_mlp(x_BTD: Array, w_gu_OD: Array, w_down_DF: Array) -> Array:
    """`mlp` with gate and up fused into one [2F, D] matrix (gate rows first) and the down
    projection as [D, F]: the decode layout (`transformer.decode_layers`)."""
    gu = dense("BTD,OD->BTO", x_BTD, w_gu_OD)
    F = w_gu_OD.shape[0] // 2
    return dense("BTF,DF->BTD", jax.nn.silu(gu[..., :F]) * gu[..., F:], w_down_DF)
