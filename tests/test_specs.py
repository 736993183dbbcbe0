"""The text specs users type: sizes, token counts and batch (constraint) specs."""

from __future__ import annotations

import pytest

from hybridkv.cli.specs import parse_batch, parse_size, parse_tokens
from hybridkv.core.errors import ConfigError

GIB = 1024**3


@pytest.mark.parametrize(("text", "expected"), [
    ("40GiB", 40 * 1024**3),
    ("40GB", 40 * 1000**3),  # decimal
    ("40G", 40 * 1024**3),  # a bare G means GiB
    ("40gib", 40 * 1024**3),
    (" 40 GiB ", 40 * 1024**3),
    ("512MiB", 512 * 1024**2),
    ("512MB", 512 * 1000**2),
    ("1.5TiB", 3 * 1024**4 // 2),
    ("2TB", 2 * 1000**4),
    ("1K", 1024),
    ("2kB", 2000),
    ("5B", 5),
    ("123", 123),
    ("1", 1),
])
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["-3", "abc", "0", "0.4", "", "1e3", "40GiBB", "nan", "GiB", "40 XB"])
def test_parse_size_rejects_with_the_option_name(text: str) -> None:
    with pytest.raises(ConfigError, match="--gpu-mem") as info:
        parse_size(text)
    assert repr(text) in str(info.value)


def test_parse_size_names_the_option_it_is_given() -> None:
    with pytest.raises(ConfigError, match=r"^--host-mem: "):
        parse_size("lots", "--host-mem")
    with pytest.raises(ConfigError, match=r"^--host-mem: size must be > 0"):
        parse_size("0GiB", "--host-mem")


@pytest.mark.parametrize(("text", "expected"), [
    ("4k", 4096), ("4K", 4096), ("32k", 32768), ("128k", 131072), ("1m", 1048576),
    ("2M", 2 * 1048576), ("4096", 4096), (" 4k ", 4096), ("0", 0),
])
def test_parse_tokens(text: str, expected: int) -> None:
    assert parse_tokens(text, "--max-seq-len") == expected


@pytest.mark.parametrize("text", ["", "k", "1.5k", "-1", "4g", "four", "4 k"])
def test_parse_tokens_rejects_with_the_setting_name(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--max-seq-len: cannot read token count"):
        parse_tokens(text, "--max-seq-len")


def test_parse_tokens_rejects_non_ascii_digits_with_config_error() -> None:
    with pytest.raises(ConfigError, match="--max-seq-len"):
        parse_tokens("²", "--max-seq-len")


def test_parse_batch_uniform_decode() -> None:
    b = parse_batch("64x4k", "c0")
    assert b.name == "c0=64x4k"
    assert b.capacity == (4096,) * 64
    assert b.history == (4095,) * 64  # HISTORY defaults to CAPACITY - 1: a decode step
    assert b.shared_prefix_tokens == 0


def test_parse_batch_prefill_from_scratch() -> None:
    b = parse_batch("8x32k@0", "c")
    assert b.capacity == (32768,) * 8
    assert b.history == (0,) * 8


def test_parse_batch_explicit_history() -> None:
    b = parse_batch("2x4k@1k", "c")
    assert b.capacity == (4096, 4096)
    assert b.history == (1024, 1024)


def test_parse_batch_mixed_items() -> None:
    b = parse_batch("16x8k+1x128k", "c")
    assert b.capacity == (8192,) * 16 + (131072,)
    assert b.history == (8191,) * 16 + (131071,)
    assert len(b) == 17


def test_parse_batch_shared_prefix() -> None:
    b = parse_batch("32x2k,prefix=1k", "c")
    assert b.capacity == (2048,) * 32
    assert b.history == (2047,) * 32
    assert b.shared_prefix_tokens == 1024
    assert b.name == "c=32x2k,prefix=1k"


def test_parse_batch_is_case_insensitive() -> None:
    assert parse_batch("2X4K@0", "c").capacity == (4096, 4096)


@pytest.mark.parametrize("text", [
    "x4k", "0x4k", "4k", "64x", "64x4k+", "+64x4k", "ax4k", "-1x4k", "64x4k@", "64x4q",
    "64x4k,foo=1", "64x4k,prefix=zz", "64x4k,prefix=", "64 x 4k",
])
def test_parse_batch_rejects_with_the_option_name(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--constraint ") as info:
        parse_batch(text, "c")
    assert repr(text) in str(info.value)


def test_parse_batch_names_the_option_it_is_given() -> None:
    with pytest.raises(ConfigError, match=r"^--typical 'nope'"):
        parse_batch("nope", "typical", "--typical")


@pytest.mark.parametrize("text", ["64x4k@5k", "64x0"])
def test_parse_batch_impossible_history_names_the_option(text: str) -> None:
    with pytest.raises(ConfigError, match="--constraint"):
        parse_batch(text, "c")


def test_parse_batch_rejects_non_ascii_count_with_config_error() -> None:
    with pytest.raises(ConfigError, match="--constraint"):
        parse_batch("²x4k", "c")
