#!/usr/bin/env python3
"""PyTorch baselines of gpu_bench's cases, timed the way gpu_bench times foveal.

    gpu_bench --list-cases --quick > cases.json        # the shapes: one source of truth
    python3 bench/torch_baselines.py cases.json > torch.json
    gpu_bench --quick --torch torch.json --out bench.md

    python3 bench/torch_baselines.py --dry-run cases.json      # no GPU: every code path on the CPU
    python3 bench/torch_baselines.py --check-cases cases.json  # no torch: the case list (and a self-check)

Baselines (a case's "baseline"; its shape in "params"):

- copy: dst.copy_(src) of `bytes` bytes (bf16).
- matmul: torch.matmul of bf16 [m, k] x [k, n], N(0, 1) inputs, into a
  preallocated output.
- sdpa_decode: dense decode attention over the whole cache:
  scaled_dot_product_attention of q [B, Hq, 1, D] over k, v [B, Hkv, S, D],
  views of the cache in its memory order (bshd: [B, S, Hkv, D] transposed;
  bhsd: contiguous), under sdpa_kernel(FLASH_ATTENTION) and
  sdpa_kernel(CUDNN_ATTENTION). GQA by enable_gqa=True; a backend that
  refuses it gets K and V repeated to Hq heads inside the timed call (its key
  then ends in `+repeat_kv`); a backend that refuses both is null.
- sdpa_cross: VISOR's cross-attention (and Glance2Gaze's Gaze Compression):
  scaled_dot_product_attention of q [B, Nq, Hq, D] (viewed [B, Hq, Nq, D])
  over k, v [B, Nk, Hkv, D] in their memory order, not causal, the same two
  backends and GQA forms as sdpa_decode (which is this with Nq = 1).
- index_select: the per-layer loop: per layer, one torch.index_select of its
  K plane and one of its V plane (2L calls) into preallocated destinations of
  `width` slots per row. A bshd plane is gathered as [B*S, Hkv*D] rows, a
  bhsd plane as [B*Hkv*S, D] rows; padding slots (past a row's kept count)
  read the row's position 0 rather than being zeroed, a slightly smaller job
  than compact_kv's.
- text_guided_unfused: text_guided_select's steps in unfused torch ops, as
  gpu_bench's unfused candle baseline: q [B, Hq, T, D], k [B, Hkv, N, D];
  one bf16 matmul per KV group, softmax in f32, max over heads, mean over
  text, descending sort, cumsum, threshold gamma * sum, an ascending sort
  that brings the kept indices first; random N(0, 1) inputs.
- conv1d_depthwise: VISOR's position embedding, x + conv1d(x^T, weight
  [C, 1, 7], bias, padding 3, groups=C)^T on x [B, N, C] (cuDNN's depthwise
  convolution on the channels-first view, then the residual).
- interpolate_pack: VISOR-TR's token packing, interpolate (bilinear,
  align_corners=False) of x [B, h, h, C] (viewed channels-first) to the
  `resized` grid, then the space-to-depth reshape to [B, H'/2, W'/2, 4C]
  (channel (2 dy + dx) C + c, as foveal's token_pack).
- glance_unfused: Glance2Gaze's Glance Fusion as its literal formula, in
  torch ops as gpu_bench's unfused candle baseline: vq [S, B, N, dt], e
  [S, B, M, dt]; the logits vq e^T [S, B, N, M] by one bf16 matmul, their
  mean over the instruction in f32, times 1/sqrt(dt), softmax over the
  layers, then (w * vq).sum over the layers in bf16.

Timing, as gpu_bench's: input sets rotated so that together they hold 4x the
L2 size (at least 3, at most 256, within half the free memory); the case
list's warm-up runs, then its runs, each on the next set, enqueued in chunks
behind a gate (a spin kernel, torch.cuda._sleep, holds the stream while the
chunk is issued) so that the CUDA events time the GPU work, not the host's
launch overhead; the median. Each baseline is first checked on set 0 against
a result computed another way (f32 math attention on sampled rows and
queries, advanced indexing, the keep rule in f64, host dot products, the
convolution as shifted slices in f64, the bilinear taps by explicit indices
and the packing by strided slices in f64, Glance Fusion with the mean
instruction vector first in f64).

--dry-run runs every baseline and its check on CPU tensors at small shapes
(fewer heads, a small head dim, two layers; the real kept positions), with
host clocks in place of CUDA events, so that the script's code paths are
checked without a GPU (its times mean nothing).

Output (stdout), read by `gpu_bench --torch`:
    {"torch": "2.11.0", "device": "...", "cases": {key: {backend: median_us or null}}}
Identical baselines (gaze_decode's and gaze_route_decode's) are timed once.
Any error stops the script with a message and exit status 1.
"""

import argparse
import json
import math
import statistics
import sys
import time
import traceback
import types

# A reduction ratio: a number >= 1.
RATIO = "ratio"

# The parameters each baseline needs: name -> (type, or the allowed values).
PARAMS = {
    "copy": {"bytes": int},
    "matmul": {"m": int, "n": int, "k": int},
    "sdpa_decode": {
        "batch": int, "q_heads": int, "kv_heads": int, "head_dim": int, "seq": int,
        "kv_layout": ("bshd", "bhsd"),
    },
    "index_select": {
        "layers": int, "batch": int, "seq": int, "kv_heads": int, "head_dim": int,
        "kv_layout": ("bshd", "bhsd"), "width": int, "keep": list,
    },
    "text_guided_unfused": {
        "batch": int, "text": int, "visual": int, "q_heads": int, "kv_heads": int,
        "head_dim": int, "gamma": float,
    },
    "sdpa_cross": {
        "batch": int, "queries": int, "keys": int, "q_heads": int, "kv_heads": int, "head_dim": int,
        "kv_layout": ("bshd", "bhsd"),
    },
    "conv1d_depthwise": {"batch": int, "tokens": int, "channels": int},
    "interpolate_pack": {"batch": int, "side": int, "channels": int, "rho": RATIO, "resized": int},
    "glance_unfused": {"layers": int, "batch": int, "tokens": int, "instr": int, "dim": int},
}


class CaseListError(ValueError):
    pass


def load_cases(path):
    """The case list of `gpu_bench --list-cases`, checked field by field."""
    with open(path) as f:
        root = json.load(f)

    def need(ok, what):
        if not ok:
            raise CaseListError(f"{path}: {what}")

    need(isinstance(root, dict), "not a JSON object")
    for field in ("warmup", "runs"):
        need(isinstance(root.get(field), int) and root[field] >= (field == "runs"), f"`{field}` is not a count")
    need(isinstance(root.get("cases"), list), "no `cases` list")
    keys = set()
    for case in root["cases"]:
        key = case.get("key") if isinstance(case, dict) else None
        need(isinstance(key, str) and key not in keys, f"a case without a key, or a repeated key: {case!r:.80}")
        keys.add(key)
        check_params(key, case.get("baseline"), case.get("params"), need)
    return root


def check_params(key, baseline, p, need):
    """A case's baseline and its parameters (PARAMS), and the relations between them."""
    spec = PARAMS.get(baseline)
    need(spec is not None, f"{key}: unknown baseline {baseline!r}")
    need(isinstance(p, dict) and set(p) == set(spec), f"{key}: params {sorted(p or {})} are not {sorted(spec)}")
    for name, kind in spec.items():
        v = p[name]
        if kind is int:
            need(isinstance(v, int) and v > 0, f"{key}: {name} = {v!r} is not a positive integer")
        elif kind is float:
            need(isinstance(v, (int, float)) and 0 < v <= 1, f"{key}: {name} = {v!r} is not in (0, 1]")
        elif kind is RATIO:
            need(isinstance(v, (int, float)) and v >= 1, f"{key}: {name} = {v!r} is not a ratio >= 1")
        elif kind is list:
            need(isinstance(v, list), f"{key}: {name} is not a list")
        elif isinstance(kind, tuple):
            need(v in kind, f"{key}: {name} = {v!r} is not one of {kind}")
    if baseline == "index_select":
        keep = p["keep"]
        need(len(keep) == p["batch"], f"{key}: keep has {len(keep)} rows, not batch = {p['batch']}")
        for row in keep:
            need(isinstance(row, list) and len(row) <= p["width"], f"{key}: a keep row longer than width")
            need(all(isinstance(i, int) and 0 <= i < p["seq"] for i in row), f"{key}: a kept position out of [0, seq)")
    if baseline == "interpolate_pack":
        # SPEC token_pack: H' = 2 round(h / sqrt(rho)), half to even (Python's round).
        want = 2 * round(p["side"] / math.sqrt(p["rho"]))
        need(p["resized"] == want, f"{key}: resized = {p['resized']}, not 2 round(side / sqrt(rho)) = {want}")
    if "q_heads" in p:
        need(p["q_heads"] % p["kv_heads"] == 0, f"{key}: q_heads is not a multiple of kv_heads")


def self_check(listed):
    """--check-cases' checks that need no torch, beyond the list's schema: the
    dry run's shapes are valid cases too, a bad case is refused, and the pure
    Python helpers give known values."""

    def need(ok, what):
        if not ok:
            raise AssertionError(f"self-check: {what}")

    for case in listed["cases"]:
        check_params(case["key"] + " (shrunk)", case["baseline"], shrink(case["baseline"], case["params"]), need)
    for bad in (
        ("copy", {"bytes": 0}),
        ("nope", {}),
        ("sdpa_cross", {"batch": 1, "queries": 4, "keys": 9, "q_heads": 6, "kv_heads": 4, "head_dim": 64, "kv_layout": "bshd"}),
        ("interpolate_pack", {"batch": 1, "side": 27, "channels": 8, "rho": 2.0, "resized": 36}),
    ):
        try:
            check_params("bad", *bad, need)
        except AssertionError:
            continue
        need(False, f"{bad} was accepted")
    for nq in (1, 2, 5, 7, 8, 9, 256, 512):
        picks = checked_queries(nq)
        need(len(picks) == min(nq, 8) and picks[0] == 0 and picks[-1] == nq - 1, f"checked_queries({nq}) = {picks}")
    need(checked_rows(1) == [0] and checked_rows(8) == [0, 7], "checked_rows")
    # torch's align_corners=False values: halving, doubling, identity.
    need(bilinear_taps(4, 2) == ([0, 2], [1, 3], [0.5, 0.5]), f"bilinear_taps(4, 2) = {bilinear_taps(4, 2)}")
    need(
        bilinear_taps(2, 4) == ([0, 0, 0, 1], [1, 1, 1, 1], [0.0, 0.25, 0.75, 0.25]),
        f"bilinear_taps(2, 4) = {bilinear_taps(2, 4)}",
    )
    need(bilinear_taps(27, 27) == (list(range(27)), [min(i + 1, 26) for i in range(27)], [0.0] * 27), "identity taps")


def shrink(baseline, p):
    """Small shapes of the same structure, for --dry-run on the CPU."""
    p = dict(p)
    if baseline == "copy":
        p["bytes"] = min(p["bytes"], 1 << 20)
    elif baseline == "matmul":
        p.update(m=min(p["m"], 64), n=min(p["n"], 48), k=min(p["k"], 80))
    elif baseline == "sdpa_decode":
        p.update(batch=min(p["batch"], 2), head_dim=16, seq=min(p["seq"], 300))
    elif baseline == "index_select":
        p.update(layers=min(p["layers"], 2), kv_heads=1, head_dim=8)  # the real kept positions
    elif baseline == "text_guided_unfused":
        p.update(batch=min(p["batch"], 2), head_dim=16)
    elif baseline == "sdpa_cross":
        p.update(batch=min(p["batch"], 2), head_dim=16, queries=min(p["queries"], 40), keys=min(p["keys"], 300))
    elif baseline == "conv1d_depthwise":
        p.update(batch=min(p["batch"], 2), tokens=min(p["tokens"], 50), channels=min(p["channels"], 24))
    elif baseline == "interpolate_pack":
        p.update(batch=min(p["batch"], 2), channels=min(p["channels"], 8))  # the real grid sizes
    elif baseline == "glance_unfused":
        p.update(batch=min(p["batch"], 2), tokens=min(p["tokens"], 40), instr=min(p["instr"], 8), dim=64)
    return p


class Timing:
    """CUDA-event timing on the current stream (module docs). `cuda` is
    torch.cuda, or HostCuda for --dry-run."""

    CHUNK = 16

    def __init__(self, torch, cuda, device, warmup, runs):
        self.torch, self.cuda, self.device, self.warmup, self.runs = torch, cuda, device, warmup, runs
        self.l2 = cuda.get_device_properties(0).L2_cache_size
        # The spin kernel's cycles per microsecond, measured.
        cuda._sleep(1000)
        a, b = self.event(), self.event()
        a.record()
        cuda._sleep(10_000_000)
        b.record()
        b.synchronize()
        self.cycles_per_us = 10_000_000 / max(a.elapsed_time(b) * 1e3, 1e-3)

    def event(self):
        return self.cuda.Event(enable_timing=True)

    def n_sets(self, set_bytes):
        self.cuda.synchronize()
        self.cuda.empty_cache()  # the previous case's buffers
        free, _ = self.cuda.mem_get_info()
        n = min(max(-(-4 * self.l2 // max(set_bytes, 1)), 3), 256)
        while n > 3 and n * set_bytes > free // 2:
            n -= 1
        if 3 * set_bytes > free:
            raise MemoryError(f"3 input sets of {set_bytes} bytes do not fit in {free} bytes of free memory")
        return n

    def median_us(self, fn, sets):
        """The median GPU time of fn(set), rotating over `sets` input sets."""
        issue_us = 0.0
        for i in range(self.warmup):
            t = time.perf_counter()
            fn(i % sets)
            issue_us = (time.perf_counter() - t) * 1e6  # the last, settled one
        self.cuda.synchronize()
        events = [(self.event(), self.event()) for _ in range(self.runs)]
        gate_us = 2 * self.CHUNK * issue_us + 500
        run = 0
        while run < self.runs:
            chunk = range(run, min(run + self.CHUNK, self.runs))
            self.cuda._sleep(int(gate_us * self.cycles_per_us))
            t = time.perf_counter()
            for i in chunk:
                events[i][0].record()
                fn((self.warmup + i) % sets)
                events[i][1].record()
            issued_us = (time.perf_counter() - t) * 1e6
            self.cuda.synchronize()
            if issued_us > gate_us:  # the gate opened early: the chunk again, behind a longer one
                gate_us = 2 * issued_us
                continue
            run = chunk.stop
        return statistics.median(a.elapsed_time(b) * 1e3 for a, b in events)


class HostCuda:
    """--dry-run's stand-in for torch.cuda: host clocks, 1 MiB of "L2", no
    device (its times are meaningless)."""

    class Event:
        def __init__(self, enable_timing):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, end):
            return (end.t - self.t) * 1e3

    @staticmethod
    def get_device_properties(_):
        return types.SimpleNamespace(L2_cache_size=1 << 20)

    @staticmethod
    def mem_get_info():
        return 1 << 32, 1 << 32

    @staticmethod
    def _sleep(_):
        pass

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def empty_cache():
        pass


def fail_if(bad, what):
    if bad:
        raise AssertionError(what)


def rel_err(torch, got, want):
    got, want = got.double(), want.double()
    return float(torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want).clamp_min(1e-30))


def copy(torch, p, run):
    n = p["bytes"] // 2
    src = torch.randn(n, dtype=torch.bfloat16, device=run.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    fail_if(not torch.equal(dst, src), "copy: the copy differs from its source")
    return {"copy_": run.median_us(lambda s: dst.copy_(src), 1)}


def matmul(torch, p, run):
    m, n, k = p["m"], p["n"], p["k"]
    a = torch.randn(m, k, dtype=torch.bfloat16, device=run.device)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=run.device)
    c = torch.empty(m, n, dtype=torch.bfloat16, device=run.device)
    torch.matmul(a, b, out=c)
    rows, cols = torch.arange(32) * 7919 % m, torch.arange(32) * 104729 % n
    want = (a[rows].double() * b[:, cols].double().T).sum(dim=1)
    err = float((c[rows, cols].double() - want).abs().max()) / k**0.5
    fail_if(err > 2e-2, f"matmul: sampled entries off by {err:.1e} of sqrt(k)")
    return {"matmul": run.median_us(lambda s: torch.matmul(a, b, out=c), 1)}


def checked_rows(b):
    """The rows a baseline's check compares: the first and the last."""
    return sorted({0, b - 1})


def checked_queries(nq):
    """The queries attention's check compares: up to 8, spread over 0..nq-1, both ends among them."""
    return sorted({j * (nq - 1) // 7 for j in range(8)})


def bilinear_taps(n_in, n_out):
    """Per output index of one axis, bilinear resizing with half-pixel centres
    (torch's align_corners=False with an output size): the two source indices
    and the weight of the second, (i0, i1, lambda) as lists."""
    taps = []
    for o in range(n_out):
        src = max((o + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(src), n_in - 1)
        taps.append((i0, min(i0 + 1, n_in - 1), src - i0))
    return tuple(list(t) for t in zip(*taps))


def attention(torch, run, name, b, nq, nk, hq, hkv, d, kv_layout):
    """SDPA of q [B, Nq, Hq, D] over k, v [B, Nk, Hkv, D] (in `kv_layout`'s
    memory order), each viewed heads-first, under the flash and cuDNN
    backends (module docs); checked on the first and last rows at up to 8
    queries against f32 math attention with the KV heads repeated."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    g = hq // hkv

    def cache():
        if kv_layout == "bshd":
            return torch.randn(b, nk, hkv, d, dtype=torch.bfloat16, device=run.device).transpose(1, 2)
        return torch.randn(b, hkv, nk, d, dtype=torch.bfloat16, device=run.device)

    sets = [
        (torch.randn(b, nq, hq, d, dtype=torch.bfloat16, device=run.device).transpose(1, 2), cache(), cache())
        for _ in range(run.n_sets(2 * (2 * b * nq * hq * d + 2 * b * nk * hkv * d)))
    ]
    rows, picks = checked_rows(b), checked_queries(nq)
    q, k, v = (x[rows].float() for x in sets[0])
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    want = torch.softmax(q[:, :, picks] @ k.transpose(-1, -2) * d**-0.5, dim=-1) @ v

    variants = {
        "": lambda q, k, v: sdpa(q, k, v, enable_gqa=True),
        "+repeat_kv": lambda q, k, v: sdpa(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)),
    }
    times = {}
    for backend_name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel([backend]):
            for suffix, attend in variants.items():
                try:
                    got = attend(*sets[0])
                except RuntimeError as e:  # the backend refuses this form
                    why = str(e).splitlines()[0]
                    print(
                        f"torch_baselines: {backend_name}{suffix} refused B{b} Hq{hq}/Hkv{hkv} Nq{nq} Nk{nk}: {why}",
                        file=sys.stderr,
                    )
                    continue
                fail_if(tuple(got.shape) != (b, hq, nq, d), f"{name}: {backend_name}{suffix} gave shape {tuple(got.shape)}")
                err = rel_err(torch, got[rows][:, :, picks], want)
                fail_if(err > 2e-2, f"{name}: {backend_name}{suffix} is off by {err:.1e} from f32 attention")
                times[backend_name + suffix] = run.median_us(lambda s: attend(*sets[s]), len(sets))
                break
            else:
                times[backend_name] = None
    fail_if(all(t is None for t in times.values()), f"{name}: every backend refused the case")
    return times


def sdpa_decode(torch, p, run):
    return attention(
        torch, run, "sdpa_decode", p["batch"], 1, p["seq"], p["q_heads"], p["kv_heads"], p["head_dim"], p["kv_layout"]
    )


def sdpa_cross(torch, p, run):
    return attention(
        torch, run, "sdpa_cross", p["batch"], p["queries"], p["keys"],
        p["q_heads"], p["kv_heads"], p["head_dim"], p["kv_layout"],
    )


def index_select(torch, p, run):
    layers, b, seq, h, d, width = p["layers"], p["batch"], p["seq"], p["kv_heads"], p["head_dim"], p["width"]
    # Each destination slot's source position; padding slots read position 0.
    pos = torch.tensor([row + [0] * (width - len(row)) for row in p["keep"]], dtype=torch.int64)
    if p["kv_layout"] == "bshd":
        shape, rows, row_len = (b, seq, h, d), (torch.arange(b)[:, None] * seq + pos).flatten(), h * d
        dst_shape = (b, width, h, d)
    else:
        shape, row_len = (b, h, seq, d), d
        rows = ((torch.arange(b)[:, None, None] * h + torch.arange(h)[:, None]) * seq + pos[:, None, :]).flatten()
        dst_shape = (b, h, width, d)
    rows = rows.to(run.device)
    plane = lambda shape: torch.randn(shape, dtype=torch.bfloat16, device=run.device)  # noqa: E731
    n = run.n_sets(2 * layers * 2 * (b * seq + b * width) * h * d)
    sets = [[(plane(shape), plane(dst_shape)) for _ in range(2 * layers)] for _ in range(n)]

    def loop(s):
        for src, dst in sets[s]:  # per layer: K, then V
            torch.index_select(src.view(-1, row_len), 0, rows, out=dst.view(-1, row_len))

    loop(0)
    for src, dst in (sets[0][0], sets[0][-1]):
        for r, keep in enumerate(p["keep"]):
            if p["kv_layout"] == "bshd":
                ok = torch.equal(dst[r, : len(keep)], src[r, keep])
            else:
                ok = torch.equal(dst[r, :, : len(keep)], src[r][:, keep])
            fail_if(not ok, f"index_select: row {r} differs from the kept positions")
    return {"index_select": run.median_us(loop, n)}


def text_guided_unfused(torch, p, run):
    b, t, n, hq, hkv, d, gamma = (p[k] for k in ("batch", "text", "visual", "q_heads", "kv_heads", "head_dim", "gamma"))
    g = hq // hkv

    def scores(q, k):
        logits = torch.matmul(q.view(b, hkv, g * t, d), k.transpose(-1, -2)).float() * d**-0.5
        return torch.softmax(logits, dim=-1).view(b, hq, t, n).amax(dim=1).mean(dim=1)  # [B, N]

    def unfused(q, k):
        s = scores(q, k)
        sorted_s, order = torch.sort(s, dim=1, descending=True)
        kept = (torch.cumsum(sorted_s, dim=1) - sorted_s) < gamma * s.sum(dim=1, keepdim=True)
        first = torch.sort(torch.where(kept, order, order + n), dim=1).values  # kept ones first, ascending
        return first, kept.sum(dim=1)

    sets = [
        (torch.randn(b, hq, t, d, dtype=torch.bfloat16, device=run.device),
         torch.randn(b, hkv, n, d, dtype=torch.bfloat16, device=run.device))
        for _ in range(run.n_sets(2 * b * (hq * t + hkv * n) * d))
    ]
    first, count = unfused(*sets[0])
    # The rule in f64 on the same inputs: bf16 logits move a few tokens at the threshold.
    q, k = (x.double() for x in sets[0])
    s = torch.softmax(torch.matmul(q.view(b, hkv, g * t, d), k.transpose(-1, -2)) * d**-0.5, dim=-1)
    s = s.view(b, hq, t, n).amax(dim=1).mean(dim=1).cpu()
    first, count = first.cpu(), count.cpu()
    for r in range(b):
        order = torch.argsort(s[r], descending=True).tolist()
        total, before, want = float(s[r].sum()), 0.0, set()
        for i in order:
            if before >= gamma * total:
                break
            want.add(i)
            before += float(s[r, i])
        got = set(first[r, : int(count[r])].tolist())
        fail_if(abs(len(got) - len(want)) * 50 > n, f"text_guided_unfused: row {r} keeps {len(got)}, the rule {len(want)}")
        fail_if(len(got & want) < 0.95 * len(got | want), f"text_guided_unfused: row {r}'s kept set is off")
    return {"unfused": run.median_us(lambda i: unfused(*sets[i]), len(sets))}


def conv1d_depthwise(torch, p, run):
    import torch.nn.functional as F

    b, n, c = p["batch"], p["tokens"], p["channels"]
    weight = torch.randn(c, 1, 7, dtype=torch.bfloat16, device=run.device) * 0.3
    bias = torch.randn(c, dtype=torch.bfloat16, device=run.device) * 0.3
    sets = [torch.randn(b, n, c, dtype=torch.bfloat16, device=run.device) for _ in range(run.n_sets(2 * 2 * b * n * c))]

    def pos(x):
        return x + F.conv1d(x.transpose(1, 2), weight, bias, padding=3, groups=c).transpose(1, 2)

    got = pos(sets[0])
    fail_if(tuple(got.shape) != (b, n, c), f"conv1d_depthwise: shape {tuple(got.shape)}")
    # The taps as shifted slices of the zero-padded rows (cross-correlation), in f64, first and last rows.
    rows = checked_rows(b)
    x, w = sets[0][rows].double(), weight[:, 0].double()
    xp = F.pad(x, (0, 0, 3, 3))
    want = x + bias.double() + sum(w[:, t] * xp[:, t : t + n] for t in range(7))
    err = rel_err(torch, got[rows], want)
    fail_if(err > 1e-2, f"conv1d_depthwise: off by {err:.1e} from the shifted slices")
    return {"conv1d": run.median_us(lambda s: pos(sets[s]), len(sets))}


def interpolate_pack(torch, p, run):
    import torch.nn.functional as F

    b, h, c, r = p["batch"], p["side"], p["channels"], p["resized"]
    half = r // 2
    sets = [
        torch.randn(b, h, h, c, dtype=torch.bfloat16, device=run.device)
        for _ in range(run.n_sets(2 * b * (h * h + r * r) * c))
    ]

    def pack(x):
        y = F.interpolate(x.permute(0, 3, 1, 2), size=(r, r), mode="bilinear", align_corners=False)
        # [B, C, H', W'] -> [B, H'/2, dy, W'/2, dx, C] -> [B, H'/2, W'/2, (2 dy + dx) C + c]
        y = y.permute(0, 2, 3, 1).reshape(b, half, 2, half, 2, c)
        return y.permute(0, 1, 3, 2, 4, 5).reshape(b, half, half, 4 * c)

    got = pack(sets[0])
    # The bilinear taps by explicit indices, in f64.
    i0, i1, lam = bilinear_taps(h, r)
    i0, i1 = torch.tensor(i0, device=run.device), torch.tensor(i1, device=run.device)
    lam = torch.tensor(lam, dtype=torch.float64, device=run.device)
    x = sets[0].double()
    ly, lx = lam.view(1, r, 1, 1), lam.view(1, 1, r, 1)
    rows = (1 - ly) * x[:, i0] + ly * x[:, i1]  # [B, H', w, C]
    y = (1 - lx) * rows[:, :, i0] + lx * rows[:, :, i1]  # [B, H', W', C]
    # The packing by strided slices.
    want = torch.cat([y[:, dy::2, dx::2] for dy in (0, 1) for dx in (0, 1)], dim=-1)
    fail_if(tuple(got.shape) != tuple(want.shape), f"interpolate_pack: shape {tuple(got.shape)}, not {tuple(want.shape)}")
    err = rel_err(torch, got, want)
    fail_if(err > 1e-2, f"interpolate_pack: off by {err:.1e} from the explicit taps")
    return {"interpolate": run.median_us(lambda s: pack(sets[s]), len(sets))}


def glance_unfused(torch, p, run):
    s_, b, n, m, dt = (p[k] for k in ("layers", "batch", "tokens", "instr", "dim"))
    sets = [
        (torch.randn(s_, b, n, dt, dtype=torch.bfloat16, device=run.device),
         torch.randn(s_, b, m, dt, dtype=torch.bfloat16, device=run.device))
        for _ in range(run.n_sets(2 * (s_ * b * (n + m) * dt + b * n * dt)))
    ]

    def fuse(vq, e):
        g = torch.matmul(vq, e.transpose(-1, -2)).float().mean(-1) * dt**-0.5  # [S, B, N]
        w = torch.softmax(g, dim=0)
        return (w.to(vq.dtype).unsqueeze(-1) * vq).sum(0)  # [B, N, dt]

    got = fuse(*sets[0])
    fail_if(tuple(got.shape) != (b, n, dt), f"glance_unfused: shape {tuple(got.shape)}")
    # The mean instruction vector first (SPEC glance_fusion), in f64, first and last rows.
    rows = checked_rows(b)
    vq, e = (x[:, rows].double() for x in sets[0])
    g = (vq * e.mean(2, keepdim=True)).sum(-1) * dt**-0.5  # [S, R, N]
    want = (torch.softmax(g, dim=0).unsqueeze(-1) * vq).sum(0)
    err = rel_err(torch, got[rows], want)
    fail_if(err > 2e-2, f"glance_unfused: off by {err:.1e} from the mean-first form")
    return {"unfused": run.median_us(lambda i: fuse(*sets[i]), len(sets))}


BASELINES = {
    f.__name__: f
    for f in (
        copy, matmul, sdpa_decode, index_select, text_guided_unfused, sdpa_cross, conv1d_depthwise, interpolate_pack,
        glance_unfused,
    )
}
assert set(BASELINES) == set(PARAMS)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("cases", help="the output of `gpu_bench --list-cases`")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="no GPU: every baseline once on CPU tensors, small shapes")
    mode.add_argument("--check-cases", action="store_true", help="no torch: check the case list, and the helpers that need no torch")
    args = ap.parse_args()

    listed = load_cases(args.cases)
    if args.check_cases:
        self_check(listed)
        print(f"torch_baselines: {len(listed['cases'])} cases, {args.cases} is well-formed (and the self-check passed)", file=sys.stderr)
        return
    import torch

    if args.dry_run:
        run = Timing(torch, HostCuda, torch.device("cpu"), 1, 3)
    elif not torch.cuda.is_available():
        raise RuntimeError("no CUDA device for torch (run with --dry-run to check the script on the CPU)")
    else:
        run = Timing(torch, torch.cuda, torch.device("cuda"), listed["warmup"], listed["runs"])
    torch.manual_seed(0)
    done, out = {}, {}
    for case in listed["cases"]:
        baseline, params = case["baseline"], case["params"]
        if args.dry_run:
            params = shrink(baseline, params)
        same = (baseline, json.dumps(params, sort_keys=True))
        if same not in done:
            t = time.perf_counter()
            done[same] = BASELINES[baseline](torch, params, run)
            print(f"torch_baselines: {case['key']}: {done[same]} ({time.perf_counter() - t:.1f} s)", file=sys.stderr)
        out[case["key"]] = done[same]
    device = torch.cuda.get_device_name(0) if not args.dry_run else "cpu (dry run)"
    json.dump({"torch": torch.__version__, "device": device, "cases": out}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    try:
        main()
    except Exception as e:  # noqa: BLE001 - every failure is loud and non-zero
        traceback.print_exc()
        print(f"torch_baselines.py: FAILED: {e}", file=sys.stderr)
        sys.exit(1)
