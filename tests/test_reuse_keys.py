"""Block keys: exact format, chain stability, scope isolation and multimodal digests."""

from __future__ import annotations

import hashlib
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.core.types import GPU
from hybridkv.lifecycles import Full
from hybridkv.reuse import MultimodalItem, PrefixIndex, ReuseScope, block_keys

TPB = 4
SCOPE = ReuseScope()


def test_format_is_chained_sha256_of_le_int32_tokens() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    keys = block_keys(tokens, TPB, SCOPE)
    assert len(keys) == 2  # the partial third block (token 9) is never keyed
    k0 = hashlib.sha256(SCOPE.root() + struct.pack("<4i", 1, 2, 3, 4)).digest()
    k1 = hashlib.sha256(k0 + struct.pack("<4i", 5, 6, 7, 8)).digest()
    assert keys == [k0, k1]
    assert all(len(k) == 32 for k in keys)


def test_short_and_empty_prompts_have_no_keys() -> None:
    assert block_keys([], TPB, SCOPE) == []
    assert block_keys([1, 2, 3], TPB, SCOPE) == []


def test_input_types_agree() -> None:
    as_list = block_keys(list(range(20)), TPB, SCOPE)
    assert block_keys(np.arange(20, dtype=np.int64), TPB, SCOPE) == as_list
    assert block_keys(np.arange(20, dtype=np.int32), TPB, SCOPE) == as_list
    assert block_keys(tuple(range(20)), TPB, SCOPE) == as_list


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 2**31 - 1), min_size=1, max_size=64), st.integers(1, 8), st.data())
def test_changing_one_token_changes_keys_from_its_block_on(tokens: list[int], tpb: int, data: st.DataObject) -> None:
    keys = block_keys(tokens, tpb, SCOPE)
    assert len(keys) == len(tokens) // tpb
    pos = data.draw(st.integers(0, len(tokens) - 1))
    changed = list(tokens)
    changed[pos] = (changed[pos] + 1) % 2**31
    other = block_keys(changed, tpb, SCOPE)
    b = pos // tpb
    assert other[:b] == keys[:b]
    assert all(x != y for x, y in zip(other[b:], keys[b:], strict=True))
    # a longer prompt with the same prefix keeps every key of the prefix
    assert block_keys([*tokens, 5, 6, 7], tpb, SCOPE)[:len(keys)] == keys


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 1000), min_size=0, max_size=40), st.integers(1, 5), st.data())
def test_extending_a_chain_equals_hashing_from_scratch(tokens: list[int], tpb: int, data: st.DataObject) -> None:
    keys = block_keys(tokens, tpb, SCOPE)
    k = data.draw(st.integers(1, len(keys))) if keys else 0
    if k:
        assert block_keys(tokens, tpb, SCOPE, first_block=k, parent=keys[k - 1]) == keys[k:]


def test_scopes_are_isolated() -> None:
    tokens = list(range(32))
    scopes = [ReuseScope(), ReuseScope(lora_id=0), ReuseScope(lora_id=1), ReuseScope(cache_salt="a"),
              ReuseScope(lora_id=1, cache_salt="a"), ReuseScope(cache_salt="b")]
    chains = [block_keys(tokens, TPB, s) for s in scopes]
    all_keys = [k for c in chains for k in c]
    assert len(set(all_keys)) == len(all_keys)
    assert len({s.root() for s in scopes}) == len(scopes)
    assert ReuseScope(lora_id=1, cache_salt="a") == scopes[4]
    assert block_keys(tokens, TPB, ReuseScope(lora_id=1, cache_salt="a")) == chains[4]


def test_other_scope_matches_nothing_in_probe() -> None:
    tokens = list(range(32))
    idx = PrefixIndex()
    mine = block_keys(tokens, TPB, SCOPE)
    idx.insert(mine, np.arange(8), 0, np.arange(8), GPU, root=SCOPE.root())
    assert idx.probe(mine, [Full()], TPB).tokens == 32
    for scope in (ReuseScope(lora_id=3), ReuseScope(cache_salt="tenant-b")):
        match = idx.probe(block_keys(tokens, TPB, scope), [Full()], TPB)
        assert match.tokens == 0 and match.per_group[0].ordinals.size == 0


def test_multimodal_digests_change_keys_from_the_first_overlapped_block() -> None:
    tokens = [7] * 24  # placeholder ids are identical for both images
    plain = block_keys(tokens, TPB, SCOPE)
    cat = MultimodalItem(offset=9, length=6, digest=b"cat" * 8)  # tokens 9..14: blocks 2 and 3
    dog = MultimodalItem(offset=9, length=6, digest=b"dog" * 8)
    with_cat = block_keys(tokens, TPB, SCOPE, [cat])
    with_dog = block_keys(tokens, TPB, SCOPE, [dog])
    assert with_cat[:2] == plain[:2] == with_dog[:2]
    assert all(len({a, b, c}) == 3 for a, b, c in zip(plain[2:], with_cat[2:], with_dog[2:], strict=True))
    # same digest at another offset or with another length is a different prompt
    assert block_keys(tokens, TPB, SCOPE, [MultimodalItem(10, 5, cat.digest)])[2] != with_cat[2]
    assert block_keys(tokens, TPB, SCOPE, [MultimodalItem(9, 7, cat.digest)])[2] != with_cat[2]
    # the listing order of items does not matter
    a, b = MultimodalItem(0, 2, b"a"), MultimodalItem(17, 3, b"b")
    assert block_keys(tokens, TPB, SCOPE, [a, b]) == block_keys(tokens, TPB, SCOPE, [b, a])
    # an item only in the partial tail block changes no key
    assert block_keys([*tokens, 1, 1], TPB, SCOPE, [MultimodalItem(24, 2, b"x")]) == plain


def test_multimodal_block_hash_layout() -> None:
    tokens = [1, 2, 3, 4]
    item = MultimodalItem(1, 2, b"\xaa" * 32)
    enc = struct.pack("<qqI", 1, 2, 32) + item.digest
    expect = hashlib.sha256(SCOPE.root() + struct.pack("<4i", *tokens) + enc).digest()
    assert block_keys(tokens, TPB, SCOPE, [item]) == [expect]


def test_errors() -> None:
    with pytest.raises(ConfigError, match="tokens_per_block"):
        block_keys([1, 2], 0, SCOPE)
    with pytest.raises(UsageError, match="parent"):
        block_keys([1, 2, 3, 4], TPB, SCOPE, first_block=1)
    with pytest.raises(UsageError, match="parent"):
        block_keys([1, 2, 3, 4], TPB, SCOPE, parent=SCOPE.root())
    with pytest.raises(UsageError, match="1-D"):
        block_keys(np.array([[1, 2], [3, 4]]), TPB, SCOPE)
    bad_inputs = ([[1, 2], [3, 4]], [1.5, 2.0], np.array([1.5, 2.0]), [2**40], np.array([2**40]), [-(2**31) - 1])
    for bad in bad_inputs:
        with pytest.raises(UsageError, match="int32"):
            block_keys(bad, TPB, SCOPE)
    with pytest.raises(ConfigError, match="lora_id"):
        ReuseScope(lora_id=-1)
    with pytest.raises(ConfigError, match="offset"):
        MultimodalItem(-1, 2, b"x")
    with pytest.raises(ConfigError, match="digest"):
        MultimodalItem(0, 2, b"")


def test_scope_inputs_separate_chains_and_leave_the_plain_root_alone() -> None:
    """``inputs`` (an encoder input's digest) is part of the root; without it the root is the
    lora + salt digest exactly as before (keys cached under it stay valid)."""
    plain = hashlib.sha256(b"hybridkv/reuse/v1\x00" + b"\x00" + bytes(8) + b"salt").digest()
    assert ReuseScope(cache_salt="salt").root() == plain
    tokens = list(range(32))
    a = block_keys(tokens, TPB, ReuseScope(inputs=b"audio-1"))
    assert a == block_keys(tokens, TPB, ReuseScope(inputs=b"audio-1"))
    assert not set(a) & set(block_keys(tokens, TPB, ReuseScope(inputs=b"audio-2")))
    assert not set(a) & set(block_keys(tokens, TPB, ReuseScope()))
    with pytest.raises(ConfigError, match="inputs must be bytes"):
        ReuseScope(inputs="audio")  # type: ignore[arg-type]
