"""Parsing of the small text specs users type: memory sizes and batch (constraint) specs.

Sizes: ``40GiB``, ``512MiB``, ``1.5TiB`` (binary), ``40GB`` (decimal), ``40G`` (= GiB), or a
plain byte count. Token counts accept ``k``/``m`` (x1024 / x1024^2): ``32k`` = 32768.

Batch spec: ``COUNTxCAPACITY[@HISTORY]`` items joined by ``+``, then optionally
``,prefix=TOKENS`` (a shared prefix counted once). HISTORY defaults to CAPACITY - 1 (a decode
step); ``@0`` is a prefill from scratch. Examples: ``64x4k``, ``8x32k@0``, ``16x8k+1x128k``,
``32x2k,prefix=1k``.
"""

from __future__ import annotations

import re

from hybridkv.demand import Batch
from hybridkv.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def parse_size(text: str, option: str = "--gpu-mem", allow_zero: bool = False) -> int:
    """Bytes from a size like ``40GiB``; ConfigError naming ``option`` otherwise. Zero only
    with ``allow_zero`` (``--host-mem 0`` means no host tier)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{option}: cannot read size {text!r}; write e.g. 40GiB, 512MiB, "
                          "80GB or a byte count")
    number, unit = float(m.group(1)), (m.group(2) or "").upper()
    if unit.endswith("B") and len(unit) == 2:  # decimal: KB, MB, GB, TB
        scale = 1000 ** ("KMGT".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit[:1]]
    value = int(number * scale)
    if value == 0 and not allow_zero:
        raise ConfigError(f"{option}: size must be > 0, got {text!r}")
    return value


def parse_tokens(text: str, what: str) -> int:
    """A token count such as ``4096``, ``4k`` or ``1m``."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"{what}: cannot read token count {text!r}; write e.g. 4096 or 4k")
    return int(digits) * scale


def parse_batch(text: str, name: str, option: str = "--constraint") -> Batch:
    """A Batch from ``COUNTxCAPACITY[@HISTORY]+...[,prefix=TOKENS]``."""
    body, _, extra = text.partition(",")
    prefix = 0
    if extra:
        key, _, value = extra.partition("=")
        if key.strip() != "prefix":
            raise ConfigError(f"{option} {text!r}: unknown option {key.strip()!r}; "
                              "only ',prefix=TOKENS' is allowed")
        prefix = parse_tokens(value, f"{option} {text!r} prefix")
    caps: list[int] = []
    hists: list[int] = []
    for item in body.split("+"):
        count_s, sep, rest = item.strip().lower().partition("x")
        if not sep or not (count_s.isascii() and count_s.isdigit()) or int(count_s) < 1:
            raise ConfigError(f"{option} {text!r}: item {item!r} must look like "
                              "COUNTxCAPACITY[@HISTORY], e.g. 64x4k or 8x32k@0")
        cap_s, at, hist_s = rest.partition("@")
        cap = parse_tokens(cap_s, f"{option} {text!r}")
        hist = parse_tokens(hist_s, f"{option} {text!r}") if at else cap - 1
        caps += [cap] * int(count_s)
        hists += [hist] * int(count_s)
    try:
        return Batch(f"{name}={text}", tuple(caps), tuple(hists), prefix)
    except ConfigError as e:
        raise ConfigError(f"{option} {text!r}: {e}") from None
