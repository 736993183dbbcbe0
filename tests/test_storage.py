"""Pool buffers (NumPy, disk memmap, torch CPU), copy engines between every pair, run splitting,
and page addressing inside a slot."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hybridkv.core.errors import ConfigError, UsageError
from hybridkv.layouts.grouping import group_layers
from hybridkv.layouts.spec import ModelLayout, attention_layer, ssm_layer
from hybridkv.lifecycles import Full, Sliding
from hybridkv.storage.backends import DiskBuffer, NumpyBuffer, PoolBuffer, make_buffer
from hybridkv.storage.copy import MIN_RUN_SLOTS, HostCopyEngine, check_copy_args, contiguous_runs
from hybridkv.storage.pages import PageSpec, page_specs, pool_page_specs

NUM_SLOTS, SLOT_BYTES = 64, 24


def contents(buf: PoolBuffer) -> np.ndarray:
    """All bytes of a buffer as a host array."""
    return np.asarray(buf.read(np.arange(buf.num_slots, dtype=np.int32))).copy()


def torch_buffer(num_slots: int, slot_bytes: int, _: Path) -> PoolBuffer:
    pytest.importorskip("torch")
    from hybridkv.storage.torch_backend import TorchBuffer

    return TorchBuffer(num_slots, slot_bytes, device="cpu")


KINDS: dict[str, Callable[[int, int, Path], PoolBuffer]] = {
    "numpy": lambda n, b, _: NumpyBuffer(n, b),
    "disk": lambda n, b, d: DiskBuffer(n, b, str(d)),
    "torch": torch_buffer,
}


def host_engine() -> Any:
    return HostCopyEngine()


def torch_engine() -> Any:
    pytest.importorskip("torch")
    from hybridkv.storage.torch_backend import TorchCopyEngine

    return TorchCopyEngine()


ENGINES = {"host": host_engine, "torch": torch_engine}


@pytest.fixture
def buffers(tmp_path: Path) -> Iterator[Callable[[str, int, int], PoolBuffer]]:
    made: list[PoolBuffer] = []

    def make(kind: str, num_slots: int = NUM_SLOTS, slot_bytes: int = SLOT_BYTES) -> PoolBuffer:
        buf = KINDS[kind](num_slots, slot_bytes, tmp_path)
        made.append(buf)
        return buf

    yield make
    for buf in made:
        buf.close()


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_buffer_starts_zeroed_and_round_trips_slots(kind: str, buffers: Callable[..., PoolBuffer]) -> None:
    buf = buffers(kind)
    assert (buf.num_slots, buf.slot_bytes) == (NUM_SLOTS, SLOT_BYTES)
    assert kind in buf.kind
    assert contents(buf).shape == (NUM_SLOTS, SLOT_BYTES) and not contents(buf).any()
    rng = np.random.default_rng(1)
    slots = np.array([5, 0, 63, 17], np.int32)
    data = rng.integers(0, 256, (4, SLOT_BYTES), dtype=np.uint8)
    buf.write(slots, data)
    got = np.asarray(buf.read(slots))
    assert got.dtype == np.uint8 and got.shape == (4, SLOT_BYTES)
    np.testing.assert_array_equal(got, data)
    whole = contents(buf)
    np.testing.assert_array_equal(whole[slots], data)
    others = np.setdiff1d(np.arange(NUM_SLOTS), slots)
    assert not whole[others].any()


def test_numpy_buffer_read_is_a_copy() -> None:
    buf = NumpyBuffer(4, 8)
    got = buf.read(np.array([1, 2], np.int32))
    got[:] = 7
    assert not buf.array.any()


def test_disk_buffer_lives_in_its_directory_and_its_file_goes_on_close(tmp_path: Path) -> None:
    buf = DiskBuffer(16, 32, str(tmp_path))
    assert Path(buf.path).parent == tmp_path
    assert Path(buf.path).name.startswith("hybridkv-pool-") and buf.path.endswith(".bin")
    assert os.path.getsize(buf.path) == 16 * 32
    buf.write(np.array([3], np.int32), np.full((1, 32), 9, np.uint8))
    assert buf.kind == "disk" and isinstance(buf.array, np.memmap)
    buf.array.flush()
    raw = np.fromfile(buf.path, dtype=np.uint8).reshape(16, 32)
    assert raw[3].tolist() == [9] * 32 and not raw[[0, 1, 2, *range(4, 16)]].any()
    buf.close()
    assert not os.path.exists(buf.path)
    assert list(tmp_path.iterdir()) == []
    buf.close()  # closing twice is harmless


def test_disk_buffer_with_no_slots_still_makes_a_valid_file(tmp_path: Path) -> None:
    buf = DiskBuffer(0, 16, str(tmp_path))
    assert buf.array.shape == (0, 16)
    buf.close()
    assert list(tmp_path.iterdir()) == []


def test_disk_buffer_in_a_missing_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="disk tier: cannot create a pool file"):
        DiskBuffer(4, 8, str(tmp_path / "missing"))


def test_make_buffer_by_kind(tmp_path: Path) -> None:
    assert isinstance(make_buffer("numpy", 2, 8), NumpyBuffer)
    disk = make_buffer("disk", 2, 8, directory=str(tmp_path))
    assert isinstance(disk, DiskBuffer) and Path(disk.path).parent == tmp_path
    disk.close()
    with pytest.raises(ConfigError, match="unknown storage backend 'cuda'"):
        make_buffer("cuda", 2, 8)


def test_make_buffer_torch_on_cpu() -> None:
    pytest.importorskip("torch")
    buf = make_buffer("torch", 3, 16, device="cpu")
    assert buf.kind == "torch:cpu"
    assert tuple(buf.tensor.shape) == (3, 16) and str(buf.tensor.dtype) == "torch.uint8"  # type: ignore[attr-defined]
    buf.close()


def slot_pattern(rng: np.random.Generator, pattern: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct source and destination slots: scattered (gather path) or long runs (slice path)."""
    if pattern == "scattered":
        n = 20
        return (rng.choice(NUM_SLOTS, n, replace=False).astype(np.int32),
                rng.choice(NUM_SLOTS, n, replace=False).astype(np.int32))
    # two runs of 16: on average >= MIN_RUN_SLOTS long, so the engine copies slice by slice
    src = np.concatenate([np.arange(3, 19), np.arange(40, 56)]).astype(np.int32)
    dst = np.concatenate([np.arange(30, 46), np.arange(0, 16)]).astype(np.int32)
    assert len(contiguous_runs(src, dst)) * MIN_RUN_SLOTS <= src.size
    return src, dst


@pytest.mark.parametrize("pattern", ["scattered", "runs"])
@pytest.mark.parametrize("engine", sorted(ENGINES))
@pytest.mark.parametrize(("src_kind", "dst_kind"), list(itertools.product(sorted(KINDS), repeat=2)))
def test_copy_engine_moves_slots_byte_for_byte(src_kind: str, dst_kind: str, engine: str, pattern: str,
                                               buffers: Callable[..., PoolBuffer]) -> None:
    copier = ENGINES[engine]()
    src, dst = buffers(src_kind), buffers(dst_kind)
    rng = np.random.default_rng(hash((src_kind, dst_kind, pattern)) % 2**32)
    src_data = rng.integers(0, 256, (NUM_SLOTS, SLOT_BYTES), dtype=np.uint8)
    dst_data = rng.integers(0, 256, (NUM_SLOTS, SLOT_BYTES), dtype=np.uint8)
    everything = np.arange(NUM_SLOTS, dtype=np.int32)
    src.write(everything, src_data)
    dst.write(everything, dst_data)
    s, d = slot_pattern(rng, pattern)
    copier.copy(src, s, dst, d)
    copier.synchronize()
    want = dst_data.copy()
    want[d] = src_data[s]
    np.testing.assert_array_equal(contents(dst), want)
    np.testing.assert_array_equal(contents(src), src_data)  # the source is untouched


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_copy_engine_rejects_mismatched_pools_and_empty_copy_is_a_no_op(
        engine: str, buffers: Callable[..., PoolBuffer]) -> None:
    copier = ENGINES[engine]()
    a, b, c = buffers("numpy"), buffers("numpy"), buffers("numpy", 8, 16)
    a.write(np.arange(NUM_SLOTS, dtype=np.int32), np.full((NUM_SLOTS, SLOT_BYTES), 5, np.uint8))
    with pytest.raises(UsageError, match="different slot sizes: 24 B and 16 B"):
        copier.copy(a, np.array([0], np.int32), c, np.array([0], np.int32))
    with pytest.raises(UsageError, match="copy of 2 source slots into 1 targets"):
        copier.copy(a, np.array([0, 1], np.int32), b, np.array([0], np.int32))
    copier.copy(a, np.zeros(0, np.int32), b, np.zeros(0, np.int32))
    assert not contents(b).any() and not contents(c).any()


def test_check_copy_args_accepts_matching_shapes() -> None:
    a, b = NumpyBuffer(4, 8), NumpyBuffer(6, 8)
    check_copy_args(a, np.array([0, 3], np.int32), b, np.array([5, 1], np.int32))


@pytest.mark.parametrize(("src", "dst", "runs"), [
    ([], [], []),
    ([7], [2], [(7, 2, 1)]),
    ([0, 1, 2, 3], [10, 11, 12, 13], [(0, 10, 4)]),
    ([0, 1, 2, 5, 6, 9], [3, 4, 5, 7, 8, 0], [(0, 3, 3), (5, 7, 2), (9, 0, 1)]),
    ([0, 1, 2], [5, 6, 8], [(0, 5, 2), (2, 8, 1)]),  # the destination breaks the run
    ([4, 5, 7], [0, 1, 2], [(4, 0, 2), (7, 2, 1)]),  # the source breaks the run
    ([3, 2, 1], [0, 1, 2], [(3, 0, 1), (2, 1, 1), (1, 2, 1)]),  # descending is never a run
    ([1, 1], [4, 5], [(1, 4, 1), (1, 5, 1)]),
])
def test_contiguous_runs_exact(src: list[int], dst: list[int], runs: list[tuple[int, int, int]]) -> None:
    assert contiguous_runs(np.array(src, np.int32), np.array(dst, np.int32)) == runs


def test_page_specs_offsets_for_a_small_layout() -> None:
    layout = ModelLayout("pages", (
        attention_layer(1, 8, 1, Full()),  # layer 0: K, V 8 B per token
        attention_layer(1, 8, 1, Sliding(8)),  # layer 1: own life cycle, same slot bytes
        attention_layer(2, 8, 1, Full()),  # layer 2: joins layer 0's group, 16 B per token
        ssm_layer(8, 4, 1, 4),  # layer 3: conv 8 B, ssm 16 B states
    ))
    g = group_layers(layout, 4)
    assert [(lg.layer_ids, lg.slot_bytes, lg.pool_group) for lg in g.layer_groups] == [
        ((0, 2), 192, 0), ((1,), 64, 1), ((3,), 24, 2)]
    assert page_specs(g, 0) == (
        PageSpec(0, "k", 0, 32, 8, 192), PageSpec(0, "v", 32, 32, 8, 192),
        PageSpec(2, "k", 64, 64, 16, 192), PageSpec(2, "v", 128, 64, 16, 192))
    assert page_specs(g, 1) == (PageSpec(1, "k", 0, 32, 8, 64), PageSpec(1, "v", 32, 32, 8, 64))
    assert page_specs(g, 2) == (PageSpec(3, "conv", 0, 8, 0, 24), PageSpec(3, "ssm", 8, 16, 0, 24))
    for lg in g.layer_groups:
        specs = page_specs(g, lg.id)
        assert sum(s.page_bytes for s in specs) == lg.slot_bytes
        assert all(a.offset + a.page_bytes == b.offset for a, b in itertools.pairwise(specs))


def test_pool_page_specs_cover_every_layer_group_sharing_a_pool() -> None:
    layout = ModelLayout("shared", (
        attention_layer(1, 8, 2, Sliding(16, 4)),  # 16 B per token per buffer
        attention_layer(2, 8, 2, Full()),  # 32 B per token per buffer: the same slot bytes
        attention_layer(1, 8, 2, Sliding(16, 4)),
    ))
    g = group_layers(layout, 2)
    assert len(g.pool_groups) == 1 and g.pool_groups[0].layer_group_ids == (0, 1)
    specs = pool_page_specs(g, 0)
    assert set(specs) == {0, 1}
    assert specs[0] == (PageSpec(0, "k", 0, 32, 16, 128), PageSpec(0, "v", 32, 32, 16, 128),
                        PageSpec(2, "k", 64, 32, 16, 128), PageSpec(2, "v", 96, 32, 16, 128))
    assert specs[1] == (PageSpec(1, "k", 0, 64, 32, 128), PageSpec(1, "v", 64, 64, 32, 128))


# ---- CUDA (skipped without a device) ------------------------------------------------------

CUDA_PLACES: dict[str, dict[str, Any]] = {
    "cuda": {"device": "cuda"}, "pinned": {"device": "cpu", "pin_memory": True}, "cpu": {"device": "cpu"},
}


def cuda_copy_cases() -> list[Any]:
    cases = []
    for src, dst, engine in itertools.product(sorted(CUDA_PLACES), sorted(CUDA_PLACES), sorted(ENGINES)):
        cases.append(pytest.param(src, dst, engine, id=f"{src}-{dst}-{engine}"))
    return cases


@pytest.mark.cuda
@pytest.mark.parametrize(("src_place", "dst_place", "engine"), cuda_copy_cases())
def test_copies_between_cuda_and_host_are_complete_after_synchronize(src_place: str, dst_place: str,
                                                                     engine: str) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from hybridkv.storage.torch_backend import TorchBuffer

    num_slots, slot_bytes = 4096, 16384  # 64 MiB: big enough for an unfinished copy to show
    src = TorchBuffer(num_slots, slot_bytes, **CUDA_PLACES[src_place])
    dst = TorchBuffer(num_slots, slot_bytes, **CUDA_PLACES[dst_place])
    assert src.kind == {"cuda": "torch:cuda", "pinned": "torch:cpu:pinned", "cpu": "torch:cpu"}[src_place]
    gen = torch.Generator(device=src.device).manual_seed(0)
    src.tensor.random_(0, 256, generator=gen)
    rng = np.random.default_rng(0)
    s = rng.permutation(num_slots)[:3000].astype(np.int32)
    d = rng.permutation(num_slots)[:3000].astype(np.int32)
    copier = ENGINES[engine]()
    copier.copy(src, s, dst, d)
    copier.synchronize()
    want = src.tensor[torch.from_numpy(s.astype(np.int64)).to(src.device)].cpu()
    got = dst.tensor[torch.from_numpy(d.astype(np.int64)).to(dst.device)].cpu()
    wrong = int((got != want).any(dim=1).sum())
    src.close()
    dst.close()
    assert wrong == 0, f"{wrong} of {s.size} slots differ"
