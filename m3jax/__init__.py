"""m3jax: Memory3 (language modeling with explicit memory) in JAX."""

__version__ = "0.1.0"
