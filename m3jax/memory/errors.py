"""Errors of the memory bank (`m3jax.memory.bank`) and the layers under it (store, manifest,
writer lease, building). Each names the bank and what is wrong in one line."""

from __future__ import annotations


class BankError(Exception):
    """Base class of memory bank errors."""


class BankNotFoundError(BankError, FileNotFoundError):
    """No bank (no manifest and no data) at the path."""


class BankExistsError(BankError, FileExistsError):
    """A bank already exists where `create(..., exist_ok=False)` was asked to make one."""


class BankConfigError(BankError):
    """The bank was written for another model config or with another codec."""


class BankFingerprintError(BankConfigError):
    """The bank was written by other weights (the params fingerprint differs)."""


class BankCorruptError(BankError):
    """The store is truncated or damaged: bad manifest, missing shards, checksum mismatch."""


class BankReadOnlyError(BankError, PermissionError):
    """A write on a bank opened with mode="r"."""


class BankIndexError(BankError, IndexError):
    """A memory id outside [0, len(bank))."""


class BankLockedError(BankError):
    """Another writer holds the bank's writer lease (one writer at a time)."""

