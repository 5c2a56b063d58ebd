"""Process-level JAX set-up for the `m3jax` command and notebooks: the persistent compilation
cache, a compile-time meter, and quiet logs.

Compilation cache. JAX can keep compiled XLA executables on disk and load them instead of
compiling again (`jax_compilation_cache_dir`). The `m3jax` command turns it on by default, so a
second `m3jax generate` with the same model and shapes starts in seconds instead of recompiling
for 20-30 s. Where it lives, first match wins:

    m3jax CMD --compile-cache DIR   / --no-compile-cache          (flags of every subcommand)
    M3JAX_COMPILE_CACHE=DIR         / M3JAX_COMPILE_CACHE=off      (environment)
    $XDG_CACHE_HOME/m3jax/jax-compile, default ~/.cache/m3jax/jax-compile

Entries are keyed by JAX on the computation, the jax/jaxlib version and the device, so a stale
entry is never used; deleting the directory is always safe. The cache is the user's own
directory, written by JAX itself (nothing from another source is loaded from it). In Python,
`m3jax.runtime.enable_compile_cache()` does the same for a notebook.

Compile-time meter. `CompileMeter` sums the time JAX spends lowering and compiling (or loading
a compiled executable from the cache) while it is active, from JAX's own monitoring events, so
outputs can report compilation apart from tokens/s.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import warnings
from typing import Any

CACHE_ENV = "M3JAX_COMPILE_CACHE"
_OFF = ("", "0", "off", "none", "false", "no")
# compilations shorter than this are not written to the cache (JAX's default is 1 s)
MIN_COMPILE_TIME_S = 0.5
# JAX's monitoring events: lowering to StableHLO, and the backend compile (or the cache load)
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_to_mlir_module_duration", "/jax/core/compile/backend_compile_duration")
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


# XLA:CPU compiled without its YNNPACK fusions (Eigen's matrix products): faster for float32
# products of many rows on the 2-core development CPU (a prefill of 32 x 128 tokens 4.4 s instead
# of ~5.0 s, of 32 x 768 tokens 38 s instead of 51 s); YNNPACK is about 2x faster for the 32-row
# products of decoding, which keeps the default. Pass as `jax.jit(..., compiler_options=...)`.
EIGEN_CPU_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


def eigen_on_cpu(dtype: Any) -> bool:
    """Whether a many-row float32 computation should take `EIGEN_CPU_OPTIONS`: on the CPU
    backend, for float32 (bf16 keeps YNNPACK, whose bf16 products XLA's Eigen path lacks)."""
    import jax
    import numpy as np

    return jax.default_backend() == "cpu" and np.dtype(dtype) == np.float32


def default_compile_cache_dir() -> str | None:
    """The compilation cache directory when none is given: $M3JAX_COMPILE_CACHE (None when it is
    "off" / "0" / empty), else $XDG_CACHE_HOME/m3jax/jax-compile (~/.cache/m3jax/jax-compile)."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF else os.path.expanduser(env.strip())
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "m3jax", "jax-compile")


def enable_compile_cache(directory: str | None = None) -> str | None:
    """Turn JAX's persistent compilation cache on at `directory` (default:
    `default_compile_cache_dir()`; None there leaves it off). Returns the directory used, or None.
    Call it before the first compilation whose result should be cached."""
    d = directory if directory is not None else default_compile_cache_dir()
    if not d:
        return None
    d = os.path.abspath(os.path.expanduser(d))
    os.makedirs(d, exist_ok=True)
    options = {"jax_compilation_cache_dir": d, "jax_persistent_cache_min_compile_time_secs": MIN_COMPILE_TIME_S,
               "jax_persistent_cache_min_entry_size_bytes": 0}
    if "jax" in sys.modules:
        import jax

        for k, v in options.items():
            jax.config.update(k, v)
    else:  # JAX reads its options' defaults from the environment when imported: no import here
        for k, v in options.items():
            os.environ[k.upper()] = str(v)
    return d


class CompileMeter:
    """Seconds JAX spent compiling (lowering + XLA compile or cache load) and the number of
    executables loaded from the persistent cache, while active (`with CompileMeter() as m:`;
    `m.seconds`, `m.cache_hits`). Counts compilations on every thread of the process."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.compilations = 0
        self.cache_hits = 0
        self._lock = threading.Lock()

    def _on_duration(self, event: str, duration: float, **_: Any) -> None:
        if event in _COMPILE_EVENTS:
            with self._lock:
                self.seconds += float(duration)
                self.compilations += event == _COMPILE_EVENTS[1]

    def _on_event(self, event: str, **_: Any) -> None:
        if event == _CACHE_HIT_EVENT:
            with self._lock:
                self.cache_hits += 1

    def __enter__(self) -> "CompileMeter":
        from jax import monitoring

        monitoring.register_event_duration_secs_listener(self._on_duration)
        monitoring.register_event_listener(self._on_event)
        return self

    def __exit__(self, *exc: Any) -> None:
        from jax import monitoring

        monitoring.unregister_event_duration_listener(self._on_duration)
        monitoring.unregister_event_listener(self._on_event)

    def describe(self) -> str:
        """'compile 12.3 s' or 'compile 0.8 s (4 from the cache)'."""
        hits = f" ({self.cache_hits} from the cache)" if self.cache_hits else ""
        return f"compile {self.seconds:.1f} s{hits}"


def quiet_logs() -> None:
    """Silence what is noise to a command-line user: absl's pre-init warnings, TensorFlow's C++
    logs, TFDS's info lines ("Downloading and preparing dataset" for a local builder that
    downloads nothing) and its progress bars; Python warnings of third-party packages stay as they
    are. m3jax's own progress bars are unaffected."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for name in ("absl", "tensorflow_datasets", "tensorflow", "jax._src.xla_bridge", "orbax",
                 "orbax.checkpoint", "grain"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from absl import logging as absl_logging

        absl_logging.set_verbosity(absl_logging.ERROR)
        absl_logging.set_stderrthreshold("error")
    except ImportError:  # absl comes with jax's dependencies; nothing to quiet without it
        pass
    warnings.filterwarnings("ignore", message=r".*absl::InitializeLog\(\).*")
