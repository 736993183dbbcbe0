"""Rotary embeddings compiled, for the engine on a GPU.

transformers applies RoPE with several small kernels per layer: for q and again for k a
multiply by ``cos``, a ``rotate_half`` (two slices, a negation, a concatenation), a multiply
by ``sin`` and an add. In a decode step those are latency, not bandwidth. ``install``
replaces the function the model's attention modules call, ``apply_rotary_pos_emb`` of their
modeling module, by ``torch.compile`` of that same function: the same arithmetic in one or
two fused kernels, whatever the family's variant (partial rotary, interleaved halves,
attention sinks' models). Shapes are dynamic, so one compilation serves every batch size and
prefill chunk; a decode graph (``graphs.py``) captures the compiled kernels like any other.

Measured on an H200 (BENCHMARKS.md): a Gemma-3-1B-sized decode step of 128 rows at 2k
context, 3.70 ms of GPU time per graph replay before, 3.26 ms after. Compiling the MLPs too,
or whole decoder layers around the attention call, gave 3.21 ms: the rest is the GEMMs and the
attention kernels.

The replacement is a module global, so it holds for every model of that family in the
process, until ``uninstall``; it is done at most once per modeling module.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

FUNCTION = "apply_rotary_pos_emb"
_ORIGINALS: dict[str, Callable[..., Any]] = {}  # modeling module name -> its own function


def _modeling_modules(model: Any) -> list[Any]:
    """The modules of ``model``'s classes that define ``apply_rotary_pos_emb``."""
    seen: dict[str, Any] = {}
    for module in model.modules():
        name = type(module).__module__
        if name not in seen:
            source = sys.modules.get(name)
            if source is not None and callable(getattr(source, FUNCTION, None)):
                seen[name] = source
    return list(seen.values())


def default_compiler(function: Callable[..., Any]) -> Callable[..., Any]:
    import torch

    return torch.compile(function, dynamic=True)


def install(model: Any, compiler: Callable[[Callable[..., Any]], Callable[..., Any]] = default_compiler) -> list[str]:
    """Compile the rotary function of each of ``model``'s modeling modules (``compiler``:
    ``torch.compile`` with dynamic shapes); the modules' names."""
    names = []
    for source in _modeling_modules(model):
        if source.__name__ not in _ORIGINALS:
            _ORIGINALS[source.__name__] = getattr(source, FUNCTION)
            setattr(source, FUNCTION, compiler(_ORIGINALS[source.__name__]))
        names.append(source.__name__)
    return names


def uninstall(model: Any) -> int:
    """Give ``model``'s modeling modules their own rotary function back; how many."""
    restored = 0
    for source in _modeling_modules(model):
        original = _ORIGINALS.pop(source.__name__, None)
        if original is not None:
            setattr(source, FUNCTION, original)
            restored += 1
    return restored
