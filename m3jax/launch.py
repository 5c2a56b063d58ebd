"""`python -m m3jax.launch`: the former multi-host launcher, now an alias of `m3jax train`.

    python -m m3jax.launch --preset demo --stage warmup --global-batch 256 --out RUN1 ...
      ==  m3jax train --preset demo --stage warmup --batch-size 256 --out RUN1 ...

Everything (distributed start-up, process 0 preparing while the others wait, per-host data
shards, reference pairing, Orbax checkpoints, the model directory) lives in
`m3jax.train.run` behind `m3jax train`. The old flags map onto the new ones:
`--global-batch` -> `--batch-size`, `--init-params` -> `--model`, `--warmup-steps N` /
`--log-every N` / `--checkpoint-every N` -> `--train-set warmup_steps=N` / `log_every=N` /
`checkpoint_every=N`; without `--preset` or `--model` the preset is `demo`, without `--stage`
the stage is `warmup` (the launcher's defaults). `--pairs` and `--bank` remain as `m3jax
train`'s expert overrides of the reference pairing.
"""

from __future__ import annotations

import sys
from typing import Sequence

from m3jax.train.pairs import bank_reference_fn  # noqa: F401  (their former home)
from m3jax.train.run import local_path  # noqa: F401

_RENAMED = {"--global-batch": "--batch-size", "--init-params": "--model"}
_TRAIN_SET = {"--warmup-steps": "warmup_steps", "--log-every": "log_every", "--checkpoint-every": "checkpoint_every"}


def translate(argv: Sequence[str]) -> list[str]:
    """The `m3jax train` arguments of a `python -m m3jax.launch` command line."""
    out: list[str] = []
    names = set()
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        names.add(name)
        if name in _RENAMED:
            out.append(_RENAMED[name] + eq + value)
        elif name in _TRAIN_SET:
            value = value if eq else next(it, None)
            if value is None:
                raise SystemExit(f"python -m m3jax.launch: {name} needs a value")
            out += ["--train-set", f"{_TRAIN_SET[name]}={value}"]
        else:
            out.append(arg)
    if not names & {"--preset", "--init", "--init-params", "--model"}:
        out = ["--preset", "demo"] + out
    if "--stage" not in names:
        out = ["--stage", "warmup"] + out
    return ["train"] + out


def main(argv: Sequence[str] | None = None) -> int:
    from m3jax import cli

    return cli.main(translate(sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    sys.exit(main())
