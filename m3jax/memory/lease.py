"""The writer lease of a memory bank: one writer at a time, enforced in the kvstore itself (so
across processes and hosts).

Every write (`MemoryBank.create`, each append) holds the lease `writer.lock`, taken with a
conditional write (TensorStore `if_equal` on the key's storage generation: only one taker wins)
and deleted conditionally when the write ends. A lease left by a killed writer is taken over when
its process is gone (same host: pid and start time) or, from another host, when it is older than
`LOCK_TTL_S` (`break_lease` removes one at once, when you know its writer died).
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from typing import Any

import tensorstore as ts

from m3jax.memory.errors import BankError, BankLockedError
from m3jax.memory.store import default_context, describe, kvstore_spec, open_kvstore, read_key, read_key_gen, write_key

LOCK_KEY = "writer.lock"
LOCK_FORMAT = "m3jax.bank_writer_lease"
LOCK_TTL_S = 15 * 60  # a lease of another host older than this is taken over (its writer died)


def host_id() -> str:
    """This machine: host name and kernel boot id (pids are only comparable within one boot)."""
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def process_start(pid: int) -> str | None:
    """Start time of process `pid` (clock ticks since boot, /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _process_alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        pass  # exists (owned by another user)
    now = process_start(pid)
    return start is None or now is None or now == start


class WriterLease:
    """`with WriterLease(kv, base):` holds the bank's writer lease (see the module docstring)."""

    def __init__(self, kv: ts.KvStore, base: dict[str, Any]) -> None:
        self._kv, self._base, self._gen = kv, base, b""

    def __enter__(self) -> "WriterLease":
        pid = os.getpid()
        me = {"format": LOCK_FORMAT, "host": host_id(), "pid": pid, "start": process_start(pid),
              "token": uuid.uuid4().hex, "since": time.time()}
        for _ in range(3):  # another taker may win a race for a stale lease: look again
            raw, gen = read_key_gen(self._kv, LOCK_KEY, self._base)
            if raw is not None:
                holder = _parse_lease(raw)
                if holder is not None and not _lease_stale(holder):
                    raise BankLockedError(
                        f"memory bank at {describe(self._base)} is being written by process "
                        f"{holder['pid']} on {holder['host'].split('/')[0]} (since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['since']))}): "
                        f"one writer at a time")
            try:
                g = self._kv.write(LOCK_KEY, json.dumps(me).encode(), if_equal=gen).result()
            except ValueError as e:
                raise BankError(f"writing {LOCK_KEY} of {describe(self._base)}: {e}") from None
            if g.generation:
                self._gen = bytes(g.generation)
                return self
        raise BankLockedError(f"memory bank at {describe(self._base)}: another writer took the writer "
                              f"lease first: one writer at a time")

    def __exit__(self, *exc: Any) -> None:
        try:  # only our own lease: a taken-over one is left to its new holder
            self._kv.write(LOCK_KEY, None, if_equal=self._gen).result()
        except ValueError:
            pass


def _parse_lease(raw: bytes) -> dict[str, Any] | None:
    """The lease record, or None when it is not one (then it is taken over)."""
    try:
        rec = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None
    ok = (isinstance(rec, dict) and rec.get("format") == LOCK_FORMAT and isinstance(rec.get("host"), str)
          and isinstance(rec.get("pid"), int) and isinstance(rec.get("since"), (int, float))
          and isinstance(rec.get("start"), (str, type(None))))
    return rec if ok else None


def _lease_stale(rec: dict[str, Any]) -> bool:
    """Whether the writer that took lease `rec` is gone: on this machine its process is not
    running (pid and start time); from another machine, the lease is older than LOCK_TTL_S."""
    if rec["host"] == host_id():
        return not _process_alive(rec["pid"], rec["start"])
    return time.time() - float(rec["since"]) > LOCK_TTL_S


def break_lease(path: "str | dict[str, Any]", context: ts.Context | None = None) -> bool:
    """Remove a bank's writer lease whatever holds it (after a writer on another host died, to
    resume before LOCK_TTL_S passes). Only when no writer is running. Returns whether one was there."""
    base = kvstore_spec(path)
    kv = open_kvstore(base, context or default_context())
    raw = read_key(kv, LOCK_KEY, base)
    if raw is not None:
        write_key(kv, LOCK_KEY, None, base)
    return raw is not None
