"""GPU copy engine and page-table upload measurements (run on a CUDA machine).

    python benchmarks/gpu_copy.py [--pages 4096] [--json FILE]

1. PCIe ceiling: one contiguous pinned copy of the same bytes, each direction.
2. Scattered page moves, 4096 pages of 16 KiB, 64 KiB, 256 KiB, 2 MiB, both directions, for every
   mechanism of CudaCopyEngine (batched, kernel, runs, gather = the naive index_select way);
   each checked byte for byte on random data (targets poisoned first).
3. Overlap: a matmul-heavy stand-in on the compute stream, alone and while the copy engine
   moves pages on its side stream; slowdown in percent.
4. Page-table upload for 1024 requests x 3 layer groups: GPU-timeline time per step.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
import torch

from hybridkv.storage.cuda_copy import MECHANISMS, CudaCopyEngine
from hybridkv.storage.torch_backend import TorchBuffer

PAGE_SIZES = [16 << 10, 64 << 10, 256 << 10, 2 << 20]


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of fn() between CUDA events on the current device (all streams synced)."""
    out = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        torch.cuda.synchronize()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out[1:])


def naive(src: TorchBuffer, s: np.ndarray, dst: TorchBuffer, d: np.ndarray) -> None:
    """The naive way: index_select into a temporary, one copy, index_copy_ on the far side."""
    si = torch.from_numpy(s.astype(np.int64)).to(src.device)
    di = torch.from_numpy(d.astype(np.int64)).to(dst.device)
    tmp = src.tensor.index_select(0, si)
    staged = torch.empty(tmp.shape, dtype=tmp.dtype, device=dst.device, pin_memory=not dst.tensor.is_cuda)
    staged.copy_(tmp, non_blocking=True)
    torch.cuda.synchronize()
    dst.tensor.index_copy_(0, di, staged)


def scattered(rng: np.random.Generator, n_pages: int, n_slots: int) -> np.ndarray:
    return rng.choice(n_slots, n_pages, replace=False).astype(np.int32)


def bandwidth_table(n_pages: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for page in PAGE_SIZES:
        pages = n_pages if page < (2 << 20) else n_pages // 2  # 2 MiB x 2048 = 4 GiB each side
        gpu = TorchBuffer(pages * 2, page, device="cuda")
        host = TorchBuffer(pages * 2, page, device="cpu", pin_memory=True)
        gpu.tensor.random_(0, 255)
        host.tensor.random_(0, 255)
        nbytes = pages * page
        c_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        c_dst = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        d2h_ceiling = nbytes / timed(lambda a=c_src, b=c_dst: b.copy_(a, non_blocking=True))
        h2d_ceiling = nbytes / timed(lambda a=c_src, b=c_dst: a.copy_(b, non_blocking=True))

        for mech, eng in engines():
            for direction, (a, b, ceiling) in {"gpu->host": (gpu, host, d2h_ceiling),
                                               "host->gpu": (host, gpu, h2d_ceiling)}.items():
                s, d = scattered(rng, pages, a.num_slots), scattered(rng, pages, b.num_slots)
                b.tensor[torch.from_numpy(d.astype(np.int64)).to(b.device)] = 7  # poison
                eng.copy(a, s, b, d)
                eng.synchronize()
                ok = bool(torch.equal(a.tensor[torch.from_numpy(s.astype(np.int64)).to(a.device)].cpu(),
                                      b.tensor[torch.from_numpy(d.astype(np.int64)).to(b.device)].cpu()))
                t = timed(lambda a=a, s=s, b=b, d=d, eng=eng: (eng.copy(a, s, b, d), eng.synchronize()))
                rows.append({"page_bytes": page, "pages": pages, "direction": direction, "mechanism": mech,
                             "gb_per_s": nbytes / t / 1e9, "ceiling_gb_per_s": ceiling / 1e9,
                             "fraction_of_ceiling": (nbytes / t) / ceiling, "correct": ok})
        for direction, (a, b, ceiling) in {"gpu->host": (gpu, host, d2h_ceiling),
                                           "host->gpu": (host, gpu, h2d_ceiling)}.items():
            s, d = scattered(rng, pages, a.num_slots), scattered(rng, pages, b.num_slots)
            t = timed(lambda a=a, s=s, b=b, d=d: naive(a, s, b, d), repeats=3)
            rows.append({"page_bytes": page, "pages": pages, "direction": direction, "mechanism": "naive",
                         "gb_per_s": nbytes / t / 1e9, "ceiling_gb_per_s": ceiling / 1e9,
                         "fraction_of_ceiling": (nbytes / t) / ceiling, "correct": True})
        del gpu, host
        torch.cuda.empty_cache()
    return rows


def engines() -> list[tuple[str, CudaCopyEngine]]:
    out = [(m, CudaCopyEngine(m)) for m in MECHANISMS if m != "gather"]  # naive: measured apart
    out += [(f"kernel/{c}", CudaCopyEngine("kernel", max_ctas=c)) for c in (2, 4, 8)]
    out += [(f"kernel/{c}w16", CudaCopyEngine("kernel", max_ctas=c, num_warps=16, block_words=8192)) for c in (2, 4)]
    return out


def overlap(rng: np.random.Generator) -> dict:
    n = 8192
    x = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)

    def compute() -> None:
        for _ in range(20):
            torch.matmul(x, w)

    alone = timed(compute)
    page, pages = 64 << 10, 4096
    gpu = TorchBuffer(pages * 2, page, device="cuda")
    host = TorchBuffer(pages * 2, page, device="cpu", pin_memory=True)
    out = {"compute_alone_ms": alone * 1e3}
    for mech, eng in engines():
        if mech in ("runs", "gather"):
            continue
        s, d = scattered(rng, pages, gpu.num_slots), scattered(rng, pages, host.num_slots)

        def both(eng=eng, s=s, d=d) -> None:
            for _ in range(3):
                eng.copy(gpu, s, host, d)
                eng.copy(host, d, gpu, s)
            compute()

        def only_copies(eng=eng, s=s, d=d) -> None:
            for _ in range(3):
                eng.copy(gpu, s, host, d)
                eng.copy(host, d, gpu, s)
            eng.synchronize()

        # compute time on its own stream while copies run: events on the compute stream only
        torch.cuda.synchronize()
        times = []
        for _ in range(6):
            for _ in range(3):
                eng.copy(gpu, s, host, d)
                eng.copy(host, d, gpu, s)
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            compute()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        copy_t = timed(only_copies)
        out[f"compute_with_{mech}_copies_ms"] = statistics.median(times[1:]) * 1e3
        out[f"slowdown_{mech}_pct"] = (statistics.median(times[1:]) / alone - 1) * 100
        out[f"copies_alone_ms_{mech}"] = copy_t * 1e3
    return out


def table_upload() -> dict:
    from hybridkv.core.types import GIB
    from hybridkv.engine.tables import PageTableUploader, TableMirror
    from hybridkv.layouts.spec import ModelLayout, attention_layer
    from hybridkv.lifecycles import Full, Sliding
    from hybridkv.manager.manager import KVCacheManager, ManagerConfig
    from hybridkv.manager.tiers import StorageConfig
    from hybridkv.planning.demand import Batch
    from hybridkv.planning.planner import PlanSpec, plan

    layers = (attention_layer(8, 128, 2, Sliding(128)), attention_layer(8, 96, 2, Sliding(1024)),
              attention_layer(8, 64, 2, Full()))
    prefill = Batch.uniform("prefill", 1024, 2000, 0)
    p = plan(PlanSpec(ModelLayout("three", layers), 64 * GIB, 4096, max_batch_size=1024, constraints=(prefill,)))
    m = KVCacheManager(p, ManagerConfig(max_active_requests=1024, storage=StorageConfig(with_data=False)))
    hs = [m.open() for _ in range(1024)]
    assert m.step(hs, [2000] * 1024, [0] * 1024) is not None
    up = PageTableUploader(3, 1024, 256)
    mirror = TableMirror(m)
    up.timing = mirror.timing = True
    caps = np.full(1024, 2000, np.int64)
    host_full, host_delta = [], []
    import time
    for _ in range(200):
        tables = m.step(hs, caps + 1, caps)
        caps += 1
        t0 = time.perf_counter()
        up.upload(tables)
        t1 = time.perf_counter()
        mirror.sync()
        t2 = time.perf_counter()
        host_full.append((t1 - t0) * 1e6)
        host_delta.append((t2 - t1) * 1e6)
    torch.cuda.synchronize()
    ok = all(torch.equal(d.cpu(), torch.from_numpy(t[:1024]))
             for d, t in zip(mirror.tables(), m.rows.tables, strict=True))
    width = tables.block_table(0).shape[1]

    def med(pairs) -> float:
        return statistics.median(a.elapsed_time(b) for a, b in pairs[20:]) * 1e3

    return {"requests": 1024, "layer_groups": 3, "width_blocks": width,
            "full_bytes_per_step": 3 * 1024 * width * 4 + 1024 * 4,
            "full_gpu_us_median": med(up.gpu_ms), "full_host_us_median": statistics.median(host_full[20:]),
            "delta_gpu_us_median": med(mirror.gpu_ms), "delta_host_us_median": statistics.median(host_delta[20:]),
            "mirror_equals_host_tables": ok}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=4096)
    ap.add_argument("--json")
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    res = {"device": torch.cuda.get_device_name()}
    if "upload" not in args.skip:
        res["table_upload"] = table_upload()
        print(json.dumps(res["table_upload"]))
    if "bandwidth" not in args.skip:
        res["bandwidth"] = bandwidth_table(args.pages, rng)
    if "overlap" not in args.skip:
        res["overlap"] = overlap(rng)
        print(json.dumps(res["overlap"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    print(f"{'page':>8} {'dir':>10} {'mechanism':>9} {'GB/s':>7} {'ceiling':>8} {'frac':>5} ok")
    for r in res.get("bandwidth", []):
        print(f"{r['page_bytes'] >> 10:>7}K {r['direction']:>10} {r['mechanism']:>9} {r['gb_per_s']:7.1f} "
              f"{r['ceiling_gb_per_s']:8.1f} {r['fraction_of_ceiling']:5.2f} {r['correct']}")


if __name__ == "__main__":
    main()
