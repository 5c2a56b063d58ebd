"""m3jax: Memory3 (language modeling with explicit memory) in JAX."""

__version__ = "0.1.0"


def load_model(name_or_dir: str):
    """(config, params, tokenizer) of a model directory or of a shipped model by name, e.g.
    `m3jax.load_model("smollm2-135m-memory")` (see `m3jax.convert.load_model`)."""
    from m3jax.convert import load_model as _load

    return _load(name_or_dir)
