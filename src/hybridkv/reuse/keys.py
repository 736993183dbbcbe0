"""Block keys: one chained SHA-256 digest per full block of a prompt.

A key names *a block in the context of everything before it*: ``key_i`` hashes ``key_{i-1}``
with block ``i``'s tokens (little-endian int32) and the content digests of the multimodal
items that overlap the block. Two requests share ``key_i`` exactly when their first
``(i + 1) * tpb`` tokens (and the media in them) agree, so a key can stand for the KV of
its block without storing the prefix, and a router can compare prefixes key by key::

    root(scope) ──> key_0 ──> key_1 ──> key_2        (block 3 is partial: no key)
                    ▲ t0..t15  ▲ t16..t31  ▲ t32..t47 + image digest @ offset 40

Why one key per block and not per token or per prompt: a block (page) is the unit the
manager can point two block tables at, so it is the unit that can be shared. A partial last
block is never keyed: its page is still being written, and sharing it would let one request
write into a page another reads (the manager copies partial blocks on fork for that reason).

The chain is seeded by ``ReuseScope.root()``: a different LoRA adapter or cache salt
gives a different root and hence disjoint keys, so tenants or adapters never share KV.
Multimodal placeholder token ids alone never decide a key (every image may use the same
placeholder id); the item's content digest and its span do.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from hybridkv.core.errors import ConfigError, UsageError

KEY_BYTES = 32
"""A key is a 32-byte SHA-256 digest naming one full block together with everything before it."""
_ROOT_TAG = b"hybridkv/reuse/v1\x00"
_ITEM = struct.Struct("<qqI")  # offset, length, digest length: a fixed header keeps items unambiguous
_I32_MIN, _I32_MAX = np.iinfo(np.int32).min, np.iinfo(np.int32).max


@dataclass(frozen=True, slots=True)
class ReuseScope:
    """What must match, besides tokens, for two requests to share KV: the LoRA adapter
    (None = base model), a free-form cache salt (per tenant, per system prompt version...)
    and ``inputs``: a digest of inputs the KV depends on outside the token stream (an
    encoder-decoder's audio, a cross-attention model's image), computed by the caller."""

    lora_id: int | None = None
    cache_salt: str = ""
    inputs: bytes = b""
    _root: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.lora_id is not None and (isinstance(self.lora_id, bool) or self.lora_id < 0):
            raise ConfigError(f"lora_id must be None or an int >= 0, got {self.lora_id!r}")
        if not isinstance(self.inputs, bytes):
            raise ConfigError(f"inputs must be bytes (a content digest), got {type(self.inputs).__name__}")
        lora = b"\x00" + bytes(8) if self.lora_id is None else b"\x01" + struct.pack("<q", self.lora_id)
        # 0xff never occurs in UTF-8, so the salt and the inputs cannot run into each other;
        # without inputs the root is what it always was
        inputs = b"\xff" + struct.pack("<q", len(self.inputs)) + self.inputs if self.inputs else b""
        digest = hashlib.sha256(_ROOT_TAG + lora + self.cache_salt.encode("utf-8") + inputs).digest()
        object.__setattr__(self, "_root", digest)

    def root(self) -> bytes:
        """The digest that seeds this scope's key chain (the 'parent' of block 0)."""
        return self._root


@dataclass(frozen=True, slots=True)
class MultimodalItem:
    """An image / audio clip occupying tokens ``[offset, offset + length)`` of the prompt,
    entering the keys by its content ``digest`` (computed by the caller, e.g. SHA-256 of
    the pixels), never by its placeholder token ids."""

    offset: int
    length: int
    digest: bytes

    def __post_init__(self) -> None:
        if self.offset < 0 or self.length < 1:
            raise ConfigError(f"multimodal item needs offset >= 0 and length >= 1, "
                              f"got offset={self.offset} length={self.length}")
        if not self.digest:
            raise ConfigError("multimodal item needs a non-empty content digest")

    def encode(self) -> bytes:
        """Bytes this item adds to the hash of every block it overlaps."""
        return _ITEM.pack(self.offset, self.length, len(self.digest)) + self.digest


def _token_bytes(tokens: npt.ArrayLike) -> bytes:
    """Little-endian int32 bytes of the token ids; UsageError unless 1-D integers in range."""
    if isinstance(tokens, list | tuple):  # struct checks type and range in one fast pass
        try:
            return struct.pack(f"<{len(tokens)}i", *tokens)
        except struct.error as e:
            raise UsageError(f"token ids must be integers that fit in int32: {e}") from e
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise UsageError(f"tokens must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype != np.int32:
        if not np.issubdtype(arr.dtype, np.integer):
            raise UsageError(f"token ids must be integers that fit in int32, got dtype {arr.dtype}")
        if int(arr.min()) < _I32_MIN or int(arr.max()) > _I32_MAX:
            raise UsageError("token ids must be integers that fit in int32")
    return np.ascontiguousarray(arr, dtype="<i4").tobytes()


def _item_bytes(items: Sequence[MultimodalItem], tokens_per_block: int, num_blocks: int) -> dict[int, bytes]:
    """Per full block that some item overlaps: the items' encodings, in (offset, length,
    digest) order so the key does not depend on the order the caller listed them."""
    per_block: dict[int, list[bytes]] = {}
    for item in sorted(items, key=lambda it: (it.offset, it.length, it.digest)):
        first = item.offset // tokens_per_block
        last = min((item.offset + item.length - 1) // tokens_per_block, num_blocks - 1)
        enc = item.encode()
        for b in range(first, last + 1):
            per_block.setdefault(b, []).append(enc)
    return {b: b"".join(encs) for b, encs in per_block.items()}


def block_keys(
    tokens: npt.ArrayLike,
    tokens_per_block: int,
    scope: ReuseScope,
    mm_items: Sequence[MultimodalItem] = (),
    *,
    first_block: int = 0,
    parent: bytes | None = None,
) -> list[bytes]:
    """Keys of the full blocks of ``tokens`` (``len(tokens) // tokens_per_block`` of them).

    To extend a chain as a request grows, pass the whole token list, ``first_block`` = the
    number of keys already known and ``parent`` = the last of them: only blocks from
    ``first_block`` on are hashed and returned. Item offsets are always absolute.
    """
    if tokens_per_block < 1:
        raise ConfigError(f"tokens_per_block must be >= 1, got {tokens_per_block}")
    if first_block < 0 or (first_block > 0) != (parent is not None):
        raise UsageError(f"block_keys: parent (the key of block {first_block - 1}) is required exactly "
                         f"when first_block > 0, got first_block={first_block}")
    buf = _token_bytes(tokens)
    step = 4 * tokens_per_block
    num_blocks = len(buf) // step
    extra = _item_bytes(mm_items, tokens_per_block, num_blocks) if mm_items else {}
    prev: bytes = scope.root() if parent is None else parent
    sha = hashlib.sha256
    out: list[bytes] = []
    for b in range(first_block, num_blocks):
        data = prev + buf[b * step:(b + 1) * step]
        if extra:
            data += extra.get(b, b"")
        prev = sha(data).digest()
        out.append(prev)
    return out
