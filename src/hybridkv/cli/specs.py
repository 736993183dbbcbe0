"""Parsing of the small text specs users type: memory sizes and batch (constraint) specs.

Sizes: ``40GiB``, ``512MiB``, ``1.5TiB`` (binary), ``40GB`` (decimal), ``40G`` (= GiB), or a
plain byte count. Token counts accept ``k``/``m`` (x1024 / x1024^2): ``32k`` = 32768.

Batch spec: ``COUNTxCAPACITY[@HISTORY]`` items joined by ``+``, then optionally
``,prefix=TOKENS`` (a shared prefix counted once). HISTORY defaults to CAPACITY - 1 (a decode
step); ``@0`` is a prefill from scratch. Examples: ``64x4k``, ``8x32k@0``, ``16x8k+1x128k``,
``32x2k,prefix=1k``.

Sizes are read exactly (decimal arithmetic, rounded down to a byte) and checked against
limits.MAX_BYTES, token counts against MAX_TOKENS and request counts against MAX_REQUESTS,
before anything is built from them.
"""

from __future__ import annotations

import re
from decimal import Decimal, localcontext

from hybridkv.core.errors import ConfigError
from hybridkv.core.limits import MAX_BYTES, MAX_REQUESTS, MAX_TOKENS, check_max
from hybridkv.planning.demand import Batch

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
_MAX_DIGITS = 24  # more digits than any bound here has: too large, whatever they say


def _digits_value(digits: str) -> int:
    """``int(digits)``, or 10^_MAX_DIGITS for a number too long to be under any bound
    (int() refuses past 4300 digits, and reading it is wasted work)."""
    return int(digits) if len(digits.lstrip("0")) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _got(digits: str, what: str) -> str:
    """check_max's ``got`` for a number too long to show."""
    n = len(digits.lstrip("0"))
    return f"a {n}{what}" if n > _MAX_DIGITS else ""


def parse_size(text: str, option: str = "--gpu-mem", allow_zero: bool = False) -> int:
    """Bytes from a size like ``40GiB``; ConfigError naming ``option`` otherwise. Zero only
    with ``allow_zero`` (``--host-mem 0`` means no host tier)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"{option}: cannot read size {text!r}; write e.g. 40GiB, 512MiB, "
                          "80GB or a byte count")
    digits, unit = m.group(1), (m.group(2) or "").upper()
    if unit.endswith("B") and len(unit) == 2:  # decimal: KB, MB, GB, TB
        scale = 1000 ** ("KMGT".index(unit[0]) + 1)
    else:
        scale = _UNITS[unit[:1]]
    whole = digits.partition(".")[0]
    if len(whole.lstrip("0")) > _MAX_DIGITS:
        value = _digits_value(whole)
    else:
        with localcontext() as ctx:
            ctx.prec = len(digits) + 20  # exact: the digits times a <= 13-digit scale
            value = int(Decimal(digits) * scale)
    if value == 0 and not allow_zero:
        raise ConfigError(f"{option}: size must be > 0, got {text!r}")
    check_max(option, value, MAX_BYTES, "write a smaller size", " B", _got(whole, "-digit size"))
    return value


def parse_tokens(text: str, what: str) -> int:
    """A token count such as ``4096``, ``4k`` or ``1m``."""
    t = text.strip().lower()
    scale = {"k": 1024, "m": 1024**2}.get(t[-1:], 1)
    digits = t[:-1] if scale > 1 else t
    if not (digits.isascii() and digits.isdigit()):
        raise ConfigError(f"{what}: cannot read token count {text!r}; write e.g. 4096 or 4k")
    value = _digits_value(digits) * scale
    check_max(what, value, MAX_TOKENS, "write a smaller count", " tokens", _got(digits, "-digit count"))
    return value


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
        if not sep or not (count_s.isascii() and count_s.isdigit()) or _digits_value(count_s or "0") < 1:
            raise ConfigError(f"{option} {text!r}: item {item!r} must look like "
                              "COUNTxCAPACITY[@HISTORY], e.g. 64x4k or 8x32k@0")
        count = _digits_value(count_s)
        check_max(f"{option} {text!r}: requests", len(caps) + count, MAX_REQUESTS,
                  "give a smaller COUNT (the batch is built request by request)", got=_got(count_s, "-digit count"))
        cap_s, at, hist_s = rest.partition("@")
        cap = parse_tokens(cap_s, f"{option} {text!r}")
        hist = parse_tokens(hist_s, f"{option} {text!r}") if at else cap - 1
        caps += [cap] * count
        hists += [hist] * count
    try:
        return Batch(f"{name}={text}", tuple(caps), tuple(hists), prefix)
    except ConfigError as e:
        raise ConfigError(f"{option} {text!r}: {e}") from None
