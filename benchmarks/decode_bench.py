"""GPU benchmark of the decoding path (``flash_attn_with_kvcache``): correctness, then speed against
PyTorch's SDPA backends and compiled FlexAttention, measured in the same run.

    PYTHONPATH=src python3 benchmarks/decode_bench.py --out DIR [--batches 1 4 16 64]
        [--cache-lens 1024 8192 32768 131072] [--skip-tune] [--budget-s 330] [--cudagraph] [--window W]

One new token per sequence (seqlen_q = 1), head dim 128, GQA 32:8, bf16, full caches of the given
length. Decoding is memory-bound, so the figure of merit is the achieved bandwidth: bytes of K and V
read (2 · batch · cache_len · kv_heads · head_dim · 2 B) per second, against a device-to-device copy
measured here ((read + write bytes) / time of a 1 GiB ``copy_``). Times are medians of
``triton.testing.do_bench`` (L2 flushed before each call); with ``--cudagraph``, of replays of a
captured CUDA graph (``do_bench_cudagraph``): the kernels without the host's launch time, as a server
that captures its decode step sees them — but without L2 flushes, so a cache that fits in L2 (50 MB)
reads faster than memory allows. Providers:

* ``flashlab``: the flash-attn cache layout (batch, seqlen, kv_heads, dim); ``flashlab-paged16``:
  the same bytes as 16-token pages in shuffled order through a block table; ``flashlab-bhsd``: our
  kernel on the peers' (batch, kv_heads, seqlen, dim) tensor (a strided view, no copy);
* ``sdpa-*``: ``F.scaled_dot_product_attention(enable_gqa=True)`` per backend (errors recorded),
  ``sdpa-default`` with no backend forced; ``flex``: ``torch.compile(flex_attention)``, static shapes.

A tuning section (tile configs, split counts, page sizes) follows if time is left. Rows go to
DIR/decode_bench.json as they are measured; a short table is printed last.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashlab.decoding as decoding
from flashlab.decoding import flash_attn_with_kvcache
from flashlab.kernels.configs import TileConfig
from flashlab.reference import accuracy_check, naive_attention, reference_attention

DEVICE = "cuda"
HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
CORRECTNESS_CASES = [  # batch, seqlen_q, heads, kv_heads, head_dim, max cache length, page size, dtype
    (1, 1, 32, 8, 128, 32768, None, torch.bfloat16), (4, 1, 32, 8, 128, 8191, 16, torch.float16),
    (3, 4, 32, 8, 128, 20000, 256, torch.bfloat16), (2, 64, 32, 8, 128, 3001, 48, torch.float16),
    (5, 1, 16, 1, 64, 4097, 64, torch.bfloat16), (2, 2, 8, 2, 256, 2500, None, torch.float16),
]
# Tuning: split counts per (batch, cache_len); page sizes and tile configs at the first two / all points.
# The first points settle round 7's question (whole waves: 2 or 3 splits at B16, 1 or 2 at B32).
TUNE_SPLITS = {(16, 8192): [2, 3, 4], (16, 32768): [2, 3, 4], (32, 8192): [1, 2, 3], (4, 32768): [8, 9, 12],
               (1, 32768): [8, 16, 24, 32, 33, 48, 64, 96, 128], (64, 8192): [1, 2, 3], (1, 1024): [1, 2, 4, 8, 16],
               (16, 1024): [1, 2, 3, 4, 8], (64, 32768): [1, 2, 3]}
TUNE_PAGES = (16, 64, 256)
TUNE_PAGED_STAGES = (3, 4, 5)
TUNE_CONFIGS = [(32, 4, 3), (64, 4, 2), (64, 4, 4), (64, 8, 3), (128, 4, 2), (128, 4, 3), (128, 8, 3), (64, 2, 3)]
MATH_MAX_KEYS = 4 * 8192  # batch × cache_len above which the math backend (expands k/v 4×) is skipped


CUDA_GRAPHS = False  # --cudagraph: time replays of a captured CUDA graph (the kernels, no host launch cost)
WINDOW = 0  # --window W: also flashlab with window_size=(W, -1) (GB/s over the W + 1 keys it reads)


def bench(fn, rep: int = 100) -> float:
    if CUDA_GRAPHS:
        return triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median")
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def copy_bandwidth() -> float:
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device=DEVICE), torch.empty(n, dtype=torch.uint8, device=DEVICE)
    ms = bench(lambda: dst.copy_(src))
    return 2 * n / ms / 1e6  # GB/s


def kv_bytes(batch: int, cache_len: int, dtype: torch.dtype) -> int:
    return 2 * batch * cache_len * KV_HEADS * HEAD_DIM * dtype.itemsize


def paged_view(cache: torch.Tensor, page: int, table: torch.Tensor | None = None):
    """The contiguous cache seen as pages (no copy) with a shuffled block table: same bytes, paged addressing."""
    batch, cache_len = cache.shape[:2]
    pages = cache.view(batch * cache_len // page, page, *cache.shape[2:])
    if table is None:
        table = torch.randperm(pages.shape[0], device=cache.device, dtype=torch.int32).view(batch, -1)
    return pages, table


def to_pages(cache: torch.Tensor, page: int, table: torch.Tensor | None = None):
    """A copy of the cache in shuffled pages holding the same logical content (for correctness)."""
    batch, cache_len = cache.shape[:2]
    per_row = -(-cache_len // page)
    if table is None:
        table = torch.randperm(batch * per_row + 3, device=cache.device, dtype=torch.int32)[:batch * per_row]
        table = table.view(batch, per_row)
    padded = torch.cat([cache, cache.new_zeros(batch, per_row * page - cache_len, *cache.shape[2:])], 1)
    pages = cache.new_zeros(batch * per_row + 3, page, *cache.shape[2:])
    pages[table.flatten().long()] = padded.view(batch * per_row, page, *cache.shape[2:])
    return pages, table


def check_correctness(rows: list[dict]) -> bool:
    ok_all = True
    for b, sq, h, hk, d, max_len, page, dtype in CORRECTNESS_CASES:
        torch.manual_seed(max_len)
        lens = torch.randint(0, max_len - sq, (b,), device=DEVICE, dtype=torch.int32)
        lens[0] = max_len - sq
        q = torch.randn(b, sq, h, d, device=DEVICE, dtype=dtype)
        kc, vc = (torch.randn(b, max_len, hk, d, device=DEVICE, dtype=dtype) for _ in range(2))
        k, v = (torch.randn(b, sq, hk, d, device=DEVICE, dtype=dtype) for _ in range(2))
        kp = vp = table = None
        if page is not None:
            kp, table = to_pages(kc, page)
            vp, _ = to_pages(vc, page, table)
        out = flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens, causal=True)
        checks, appended = [], True
        for i, n in enumerate((lens + sq).tolist()):
            appended &= bool(torch.equal(kc[i, n - sq:n], k[i]) and torch.equal(vc[i, n - sq:n], v[i]))
            kb, vb = kc[i:i + 1, :n], vc[i:i + 1, :n]
            ref = reference_attention(q[i:i + 1], kb, vb, causal=True)
            checks.append(accuracy_check(out[i:i + 1], ref, naive_attention(q[i:i + 1], kb, vb, causal=True)))
        paged_ok = True
        if kp is not None:
            got = flash_attn_with_kvcache(q, kp, vp, k, v, cache_seqlens=lens, block_table=table, causal=True)
            paged_ok = bool(torch.equal(got, out))
        ok = all(c.ok for c in checks) and appended and paged_ok
        ok_all &= ok
        name = f"B{b}-Sq{sq}-H{h}:{hk}-D{d}-L{max_len}-P{page}-{str(dtype)[6:]}"
        worst = max(checks, key=lambda c: c.max_error / c.allowed)
        print(f"{'ok  ' if ok else 'FAIL'} {name}: worst {worst}; appended={appended} paged==contiguous={paged_ok}")
        rows.append({"kind": "correctness", "case": name, "ok": ok, "worst": str(worst), "appended": appended,
                     "paged_equal": paged_ok})
    return ok_all


def time_row(rows, provider, batch, cache_len, dtype, fn, copy_gbs, keys_read: int | None = None, **extra) -> None:
    """One timed row; ``keys_read`` (default: the whole cache) sizes the bytes behind the GB/s."""
    row = {"kind": "time", "provider": provider, "batch": batch, "cache_len": cache_len, **extra}
    try:
        ms = bench(fn)
        gbs = kv_bytes(batch, min(cache_len, keys_read or cache_len), dtype) / ms / 1e6
        row.update(us=ms * 1e3, gbs=gbs, pct_copy=100 * gbs / copy_gbs)
    except Exception as e:  # a backend that cannot run this case (unsupported, OOM): recorded, sweep goes on
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        torch.cuda.empty_cache()
    rows.append(row)


def make_flex():
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.config.cache_size_limit = 256  # one static compile per shape, never the eager fallback
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 256
    return torch.compile(flex_attention, dynamic=False)


def time_ours(rows, batch, cache_len, dtype, copy_gbs) -> None:
    """flashlab on the flash-attn layout, contiguous and as shuffled 16-token pages (same bytes)."""
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=DEVICE)
    kc, vc = (torch.empty(batch, cache_len, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype).normal_()
              for _ in range(2))
    splits = decoding.choose_num_splits(batch, KV_HEADS, 1, cache_len, decoding.num_sms(0), decoding.MIN_SPLIT_KEYS)
    time_row(rows, "flashlab", batch, cache_len, dtype, copy_gbs=copy_gbs, auto_splits=splits,
             fn=lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens))
    if WINDOW:  # a sliding window reads only its keys (and the new one)
        time_row(rows, f"flashlab-window{WINDOW}", batch, cache_len, dtype, copy_gbs=copy_gbs, keys_read=WINDOW + 1,
                 fn=lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True,
                                                    window_size=(WINDOW, -1)))
    kp, table = paged_view(kc, 16)
    vp, _ = paged_view(vc, 16, table)
    time_row(rows, "flashlab-paged16", batch, cache_len, dtype, copy_gbs=copy_gbs,
             fn=lambda: flash_attn_with_kvcache(q, kp, vp, cache_seqlens=seqlens, block_table=table))


def time_peers(rows, batch, cache_len, dtype, copy_gbs, flex, with_flex: bool) -> None:
    """SDPA backends and FlexAttention on their layout (batch, kv_heads, seqlen, dim), and flashlab on
    a strided view of the same tensors."""
    q = torch.randn(batch, HEADS, 1, HEAD_DIM, device=DEVICE, dtype=dtype)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device=DEVICE)
    kt, vt = (torch.empty(batch, KV_HEADS, cache_len, HEAD_DIM, device=DEVICE, dtype=dtype).normal_()
              for _ in range(2))
    time_row(rows, "flashlab-bhsd", batch, cache_len, dtype, copy_gbs=copy_gbs,
             fn=lambda: flash_attn_with_kvcache(q.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2),
                                                cache_seqlens=seqlens))
    for name, backend in SDPA_BACKENDS.items():
        if backend == SDPBackend.MATH and batch * cache_len > MATH_MAX_KEYS:
            rows.append({"kind": "time", "provider": name, "batch": batch, "cache_len": cache_len,
                         "error": "skipped: expands k/v 4x (size)"})
            continue

        def run(backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, kt, vt, enable_gqa=True)
        time_row(rows, name, batch, cache_len, dtype, run, copy_gbs)
    time_row(rows, "sdpa-default", batch, cache_len, dtype, copy_gbs=copy_gbs,
             fn=lambda: F.scaled_dot_product_attention(q, kt, vt, enable_gqa=True))
    if with_flex:
        time_row(rows, "flex", batch, cache_len, dtype, lambda: flex(q, kt, vt, enable_gqa=True), copy_gbs)
    else:
        rows.append({"kind": "time", "provider": "flex", "batch": batch, "cache_len": cache_len,
                     "error": "skipped: time budget (one compile per shape)"})


def sweep(rows, batches, cache_lens, dtype, copy_gbs, deadline: float):
    """One point at a time, one layout at a time (64 GB of K/V at batch 64 × 128k); yields after each."""
    flex = make_flex()
    for batch in batches:
        for cache_len in cache_lens:
            time_ours(rows, batch, cache_len, dtype, copy_gbs)
            torch.cuda.empty_cache()
            time_peers(rows, batch, cache_len, dtype, copy_gbs, flex, time.time() < deadline)
            torch.cuda.empty_cache()
            yield


def host_overhead(rows, dtype) -> None:
    """Back-to-back calls without flush at a tiny size: host (Python + launch) time per call."""
    q = torch.randn(1, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    kc = torch.randn(1, 1024, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
    seqlens = torch.full((1,), 1024, dtype=torch.int32, device=DEVICE)
    qt, kt = q.transpose(1, 2).contiguous(), kc.transpose(1, 2).contiguous()
    fns = {"flashlab": lambda: flash_attn_with_kvcache(q, kc, kc, cache_seqlens=seqlens),
           "sdpa-default": lambda: F.scaled_dot_product_attention(qt, kt, kt, enable_gqa=True)}
    for name, fn in fns.items():
        for _ in range(20):
            fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            fn()
        torch.cuda.synchronize()
        rows.append({"kind": "loop", "provider": name, "batch": 1, "cache_len": 1024,
                     "us_per_call": (time.perf_counter() - t) / 500 * 1e6})


def tune(rows, dtype, copy_gbs, deadline: float) -> None:
    """Tile configs, split counts and page sizes around the defaults (for the next round's choices)."""
    points = list(TUNE_SPLITS)
    data = {}
    for batch, cache_len in points:
        q = torch.randn(batch, 1, HEADS, HEAD_DIM, device=DEVICE, dtype=dtype)
        kc, vc = (torch.randn(batch, cache_len, KV_HEADS, HEAD_DIM, device=DEVICE, dtype=dtype) for _ in range(2))
        data[batch, cache_len] = q, kc, vc, torch.full((batch,), cache_len, dtype=torch.int32, device=DEVICE)
    for (batch, cache_len), splits in TUNE_SPLITS.items():
        q, kc, vc, s = data[batch, cache_len]
        for n in splits:
            if time.time() > deadline:
                return
            time_row(rows, "flashlab", batch, cache_len, dtype, copy_gbs=copy_gbs, tune="splits", num_splits=n,
                     fn=lambda q=q, kc=kc, vc=vc, s=s, n=n: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=s,
                                                                                     num_splits=n))
    original = decoding.decode_config
    try:
        for bn, warps, stages in TUNE_CONFIGS:
            decoding.decode_config = lambda *a, c=(bn, warps, stages): TileConfig(16, *c)
            for batch, cache_len in points[:3]:
                if time.time() > deadline:
                    return
                q, kc, vc, s = data[batch, cache_len]
                time_row(rows, "flashlab", batch, cache_len, dtype, copy_gbs=copy_gbs, tune="config",
                         config=f"BN{bn} w{warps} s{stages}",
                         fn=lambda q=q, kc=kc, vc=vc, s=s: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=s))
        for page in TUNE_PAGES:
            for stages in TUNE_PAGED_STAGES:
                decoding.decode_config = lambda *a, st=stages: TileConfig(16, 64, 4, st)
                for batch, cache_len in points[:2]:
                    if time.time() > deadline:
                        return
                    q, kc, vc, s = data[batch, cache_len]
                    kp, table = paged_view(kc, page)
                    vp, _ = paged_view(vc, page, table)
                    time_row(rows, "flashlab", batch, cache_len, dtype, copy_gbs=copy_gbs, tune="page", page=page,
                             config=f"BN64 w4 s{stages}",
                             fn=lambda q=q, kp=kp, vp=vp, s=s, t=table: flash_attn_with_kvcache(
                                 q, kp, vp, cache_seqlens=s, block_table=t))
    finally:
        decoding.decode_config = original


def _us(point: dict, name: str | None) -> float:
    return point.get(name, {}).get("us", math.nan) if name else math.nan


def print_table(rows, copy_gbs) -> None:
    by = {}
    for r in rows:
        if r["kind"] == "time" and "tune" not in r:
            by.setdefault((r["batch"], r["cache_len"]), {})[r["provider"]] = r
    print(f"\ncopy bandwidth {copy_gbs:.0f} GB/s (read+write); K/V GB/s read; times in µs")
    print(f"{'B':>3} {'cache':>6} | {'flashlab':>8} {'GB/s':>5} {'%copy':>5} | {'paged16':>7} {'bhsd':>7} | "
          f"{'best SDPA':>20} {'flex':>8} | {'vs SDPA':>7} {'vs flex':>7}")
    for (b, n), p in sorted(by.items()):
        us = functools.partial(_us, p)
        sdpa = min((name for name in p if name.startswith("sdpa") and "us" in p[name]), key=us, default=None)
        ours = p.get("flashlab", {})
        print(f"{b:>3} {n:>6} | {us('flashlab'):>8.1f} {ours.get('gbs', math.nan):>5.0f} "
              f"{ours.get('pct_copy', math.nan):>5.1f} | {us('flashlab-paged16'):>7.1f} {us('flashlab-bhsd'):>7.1f} | "
              f"{(sdpa or '-'):>11} {us(sdpa):>8.1f} {us('flex'):>8.1f} | "
              f"{us(sdpa) / us('flashlab'):>6.2f}x {us('flex') / us('flashlab'):>6.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--cache-lens", type=int, nargs="+", default=[1024, 8192, 32768, 131072])
    ap.add_argument("--skip-correctness", action="store_true")
    ap.add_argument("--skip-tune", action="store_true")
    ap.add_argument("--budget-s", type=float, default=330.0, help="wall-clock budget; flex and tuning stop early")
    ap.add_argument("--cudagraph", action="store_true",
                    help="time every provider as CUDA graph replays (no host time; L2 not flushed)")
    ap.add_argument("--window", type=int, default=0, help="also time flashlab with a sliding window of this size")
    args = ap.parse_args()
    global CUDA_GRAPHS, WINDOW
    CUDA_GRAPHS, WINDOW = args.cudagraph, args.window
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    dtype = torch.bfloat16
    rows: list[dict] = [{"kind": "env", "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                         "triton": triton.__version__, "cudnn": torch.backends.cudnn.version(),
                         "sms": decoding.num_sms(0), "time": time.ctime(), "dtype": str(dtype),
                         "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "seqlen_q": 1,
                         "cudagraph": CUDA_GRAPHS}]
    dump = lambda: (args.out / "decode_bench.json").write_text(json.dumps(rows, indent=1))  # noqa: E731
    copy_gbs = copy_bandwidth()
    rows.append({"kind": "copy", "gbs": copy_gbs})
    print(f"copy bandwidth: {copy_gbs:.0f} GB/s")
    if not args.skip_correctness:
        ok = check_correctness(rows)
        print("correctness:", "PASS" if ok else "FAIL", f"({time.time() - t0:.0f}s)")
    dump()
    for _ in sweep(rows, args.batches, args.cache_lens, dtype, copy_gbs, t0 + args.budget_s * 0.75):
        dump()
    print(f"sweep done ({time.time() - t0:.0f}s)")
    host_overhead(rows, dtype)
    if not args.skip_tune:
        tune(rows, dtype, copy_gbs, t0 + args.budget_s)
        for r in rows:
            if r.get("tune"):
                what = {k: r[k] for k in ("num_splits", "page", "config") if k in r}
                print("tune", r["batch"], r["cache_len"], what, f"{r['us']:.1f} us {r['pct_copy']:.0f}%"
                      if "us" in r else r.get("error"))
    dump()
    for r in rows:
        if r["kind"] == "loop":
            print(f"host-bound loop (B1, 1k, no flush): {r['provider']} {r['us_per_call']:.1f} us/call")
    print_table(rows, copy_gbs)
    for r in rows:
        if r["kind"] == "time" and r["provider"].startswith("flashlab-window") and "us" in r:
            print(f"{r['provider']} B{r['batch']} cache {r['cache_len']}: {r['us']:.1f} us, {r['gbs']:.0f} GB/s "
                  f"over the window's keys ({r['pct_copy']:.0f}% of copy)")
    print(f"total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
