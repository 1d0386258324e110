#!/usr/bin/env python3
"""The kernel report: what the compiler made of every kernel instance, checked.

    eval "$(scripts/install-cuda.sh --env)"
    python3 scripts/kernel-report.py                # write docs/kernels.md, check
    python3 scripts/kernel-report.py --check-doc    # (CI) also fail if docs/kernels.md is stale
    python3 scripts/kernel-report.py --only window_mean   # check one op or a few, write nothing
    python3 scripts/kernel-report.py --show-loop 'window_mean/window_mean_kernel<bf16>'  # its main loop
    python3 scripts/kernel-report.py --self-test    # the parsers on made-up compiler output

No GPU needed: it compiles every kernel source that kernels-cuda/build.rs
lists in SOURCES, for every architecture of build.rs's default
FOVEAL_CUDA_ARCHS (sm_80, sm_90a), with build.rs's flags (-O3 -std=c++17
--expt-relaxed-constexpr -I include) plus `-Xptxas -v` and `-lineinfo`
(line info only: the same SASS), into cubins in a
temporary folder, as many nvcc processes at once as the machine has cores.
From ptxas's resource report it reads, per kernel instance (every template
instance), the registers, spill stores and loads, stack frame and static
shared memory; from the SASS (nvdisasm, pinned by scripts/install-cuda.sh)
the global loads by width, cp.async (LDGSTS), tensor-core instructions, the
main loop and how many 16-byte loads it keeps in flight (see `in_flight16`).

It writes docs/kernels.md (one row per instance and architecture) and exits
non-zero, naming each instance, when
  - an instance spills registers (spill stores or loads > 0), or
  - a memory-bound kernel of MEMORY_BOUND below keeps fewer 16-byte global
    loads in flight in its main loop than the table asks,
unless scripts/kernel-report-known.txt lists that instance and check as a
known, owed exception (each line names the issue that owes the fix). A
listed exception that no longer fails is an error too (remove its line), so
the list only ever holds what is still owed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNELS = ROOT / "kernels-cuda"
BUILD_RS = KERNELS / "build.rs"
DOC = ROOT / "docs" / "kernels.md"
KNOWN = ROOT / "scripts" / "kernel-report-known.txt"

# build.rs's flags for the device code (cc adds only host-compiler flags).
NVCC_FLAGS = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-I", "include"]

# Memory-bound kernels: their main loop must keep at least `min_in_flight`
# 16-byte global loads in flight (LDG.128 or 16-byte cp.async, per thread).
# These are the targets of issue 11 ("Speed"), not today's state: a kernel
# that misses one is listed in scripts/kernel-report-known.txt until fixed.
# (op = the source file's stem, kernel = a regular expression matched against
# the start of the instance name, e.g. `window_mean_kernel<bf16>`.)
# `loop_file`: where the kernel has several loops, the main loop checked is
# the one (by main_loop's rule) among the loops whose own body holds code of
# this source file (by the line info): gaze_route_decode's attend loop, not
# its routing or merge loops.
MEMORY_BOUND = [
    # op, kernel, loop_file, min_in_flight, why
    # window_mean: the 16-byte instances (<T,8,...> and <f32,4,...>; <T,1,...>
    # is the scalar path of unaligned views); kSmall (w <= 4) reads a window
    # as one 4 x 4 tile, the others a row at a time, 16 cells at once.
    ("window_mean", r"window_mean_kernel<\w+,[48],\w+,true>", None, 16,
     "every cell of a 4 x 4 window in flight: 16 16-byte loads a thread (issue 11)"),
    ("window_mean", r"window_mean_kernel<\w+,[48],\w+,false>", None, 8,
     "a window row's cells 16 at a time, at least 8 in flight (issue 11)"),
    ("multiscale_gather", r"pool_kernel<\w+,[48]>", None, 12,
     "a 4 x 4 window's pixels in flight (16 16-byte loads a thread, at least 12) (issue 11)"),
    ("compact_kv", r"gather_positions_kernel<uint4>", None, 4,
     "the 16-byte gather: four slots' loads issued before their stores (issue 11)"),
    # region_descriptors: 16 keys a thread in flight for 16-bit keys; for f32
    # keys ptxas starts the adds after 4 or 5 of the 16 loads (docs/performance.md).
    ("region_descriptors", r"region_descriptors_kernel<(bf16|f16)>", None, 16,
     "16 keys' 16-byte loads a thread in flight, positions prefetched (issue 11)"),
    ("region_descriptors", r"region_descriptors_kernel<f32>", None, 4,
     "f32 keys: at least 4 16-byte loads in flight (issue 11)"),
    ("glimpse_scores", r"glimpse_scores_mma_kernel<", None, 8,
     "the next steps' 16-byte copies (cp.async) in flight while a step is scored (issue 11)"),
    ("glimpse_scores", r"glimpse_scores_fma_kernel<", None, 1, "f32 keys streamed once in 16-byte vectors"),
    ("gaze_decode", r"gaze_attend(_mma)?_kernel<", "gaze_attend.cuh", 1, "attended K/V rows in 16-byte cp.async"),
    ("gaze_route_decode", r"gaze_route_decode(_mma)?_kernel<", "gaze_attend.cuh", 1, "attended K/V rows in 16-byte cp.async"),
]

# ---------------------------------------------------------------- build.rs


def build_rs_sources(text):
    """The SOURCES list of kernels-cuda/build.rs (paths relative to kernels-cuda)."""
    m = re.search(r"const\s+SOURCES\s*:\s*&\[&str\]\s*=\s*&\[(.*?)\];", text, re.S)
    if not m:
        raise SystemExit("kernel-report: no `const SOURCES: &[&str] = &[...]` in kernels-cuda/build.rs")
    return re.findall(r'"([^"]+)"', m.group(1))


def build_rs_archs(text):
    """build.rs's default FOVEAL_CUDA_ARCHS (e.g. ["80", "90a"])."""
    m = re.search(r'env_list\(\s*"FOVEAL_CUDA_ARCHS"\s*,\s*"([^"]*)"\s*\)', text)
    if not m:
        raise SystemExit('kernel-report: no env_list("FOVEAL_CUDA_ARCHS", "...") default in kernels-cuda/build.rs')
    return [a for a in re.split(r"[,; ]", m.group(1)) if a]


# ---------------------------------------------------------------- names

TYPE_NAMES = {
    "__nv_bfloat16": "bf16",
    "__half": "f16",
    "float": "f32",
    "unsigned char": "uint8_t",
    "unsigned short": "uint16_t",
    "unsigned int": "uint32_t",
}


def short_name(demangled):
    """`void foveal::(anonymous namespace)::k<__half, 128, 8>(params)` -> `k<f16,128,8>`."""
    name = demangled
    if name.startswith("void "):
        name = name[len("void "):]
    name = re.sub(r"foveal::\(anonymous namespace\)::|foveal::", "", name)
    # Drop the parameter list: from the first "(" outside the template arguments.
    depth = 0
    for i, ch in enumerate(name):
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            name = name[:i]
            break
    lt = name.find("<")
    if lt >= 0 and name.endswith(">"):
        args = [a.strip() for a in name[lt + 1:-1].split(",")]
        args = [TYPE_NAMES.get(a, a) for a in args]
        name = name[:lt] + "<" + ",".join(args) + ">"
    return name.replace(" ", "_")


def demangle(names):
    """Demangled names, by cu++filt from the toolchain where present, else c++filt."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names:
        return {}
    if not tool:
        raise SystemExit("kernel-report: neither cu++filt nor c++filt is on PATH (binutils)")
    out = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    lines = out.splitlines()
    if len(lines) != len(names):
        raise SystemExit(f"kernel-report: {tool} returned {len(lines)} names for {len(names)}")
    return dict(zip(names, lines))


# ---------------------------------------------------------------- ptxas -v


@dataclass
class Resources:
    entry: bool = False
    registers: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0


def parse_ptxas(log):
    """ptxas -v's report: {mangled name: Resources}, entry kernels and device functions."""
    funcs = {}
    entry = None
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            entry = m.group(1)
            funcs.setdefault(entry, Resources()).entry = True
            continue
        m = re.search(r"Function properties for (\S+)", line)
        if m:
            current = m.group(1)
            funcs.setdefault(current, Resources())
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and current:
            r = funcs[current]
            r.stack, r.spill_stores, r.spill_loads = (int(g) for g in m.groups())
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and entry:
            r = funcs[entry]
            r.registers = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            r.smem = int(s.group(1)) if s else 0
    return funcs


# ---------------------------------------------------------------- SASS

INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(?:(@!?U?P[0-9T]+)\s+)?([A-Z][A-Z0-9_.]*)\s*(.*?)\s*;")
LABEL = re.compile(r"^(\.L_x_\d+):")
LINE_INFO = re.compile(r'^\s*//## File "([^"]+)", line \d+')
SECTION = re.compile(r"^\.text\.(\S+):")
MAX_WALKS = 8  # walks of a loop body in in_flight16
REG = re.compile(r"(?<![A-Za-z0-9_])R(\d+)(\.64)?(?![0-9])")


@dataclass
class Instr:
    addr: int
    op: str
    args: str
    pred: str | None = None
    file: str | None = None  # the source file's name, from the line info


@dataclass
class Sass:
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # label -> address


def split_sass(text):
    """nvdisasm's listing: {mangled function name: Sass}."""
    funcs = {}
    cur = None
    pending_labels = []
    src = None
    for line in text.splitlines():
        m = SECTION.match(line)
        if m:
            cur = funcs.setdefault(m.group(1), Sass())
            pending_labels = []
            src = None
            continue
        if cur is None:
            continue
        m = LINE_INFO.match(line)
        if m:
            src = Path(m.group(1)).name
            continue
        m = LABEL.match(line)
        if m:
            pending_labels.append(m.group(1))
            continue
        m = INSTR.match(line)
        if m:
            addr = int(m.group(1), 16)
            for lab in pending_labels:
                cur.labels[lab] = addr
            pending_labels = []
            cur.instrs.append(Instr(addr, m.group(3), m.group(4), m.group(2), src))
    return funcs


def load_width(ins):
    """Bytes of a global load (LDG, LDGSTS, generic LD) or None for other instructions."""
    parts = ins.op.split(".")
    if parts[0] not in ("LDG", "LDGSTS", "LD"):
        return None
    mods = set(parts[1:])
    for mod, width in ((("128",), 16), (("64",), 8), (("U16", "S16"), 2), (("U8", "S8"), 1)):
        if mods & set(mod):
            return width
    return 4


def blocks_of(sass):
    """The control-flow graph: basic blocks as (first, last) instruction
    indices, and each block's successors (block indices)."""
    ins = sass.instrs
    at = {i.addr: n for n, i in enumerate(ins)}
    target = {}  # instruction index -> branch target instruction index
    leaders = {0} if ins else set()
    for n, i in enumerate(ins):
        base = i.op.split(".")[0]
        if base == "BRA":
            m = re.search(r"(\.L_x_\d+)", i.args)
            if m and sass.labels.get(m.group(1)) in at:
                target[n] = at[sass.labels[m.group(1)]]
                leaders.add(target[n])
        if base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET") and n + 1 < len(ins):
            leaders.add(n + 1)
    for lab_addr in sass.labels.values():
        if lab_addr in at:
            leaders.add(at[lab_addr])
    starts = sorted(leaders)
    blocks = [(s, (starts[k + 1] if k + 1 < len(starts) else len(ins)) - 1) for k, s in enumerate(starts)]
    block_of = {s: k for k, (s, _) in enumerate(blocks)}
    succ = []
    for k, (first, last) in enumerate(blocks):
        i = ins[last]
        base = i.op.split(".")[0]
        out = []
        if last in target:
            out.append(block_of[target[last]])
        # Falls through unless an unconditional branch, exit or return ends it.
        unconditional = i.pred is None and not i.op.startswith("BRA.DIV")
        if not (unconditional and base in ("BRA", "BRX", "JMP", "JMX", "EXIT", "RET")) and k + 1 < len(blocks):
            out.append(k + 1)
        succ.append(out)
    return blocks, succ


def dominators(succ):
    """Immediate dominators of the blocks reachable from block 0 (Cooper,
    Harvey and Kennedy's iterative algorithm): {block: idom}."""
    order, seen, stack = [], {0}, [(0, iter(succ[0]))] if succ else []
    while stack:  # postorder by an iterative depth-first search
        node, it = stack[-1]
        nxt = next((t for t in it if t not in seen), None)
        if nxt is None:
            order.append(node)
            stack.pop()
        else:
            seen.add(nxt)
            stack.append((nxt, iter(succ[nxt])))
    rpo = order[::-1]
    index = {b: n for n, b in enumerate(rpo)}
    pred = {b: [] for b in rpo}
    for b in rpo:
        for t in succ[b]:
            pred[t].append(b)
    idom = {0: 0} if succ else {}
    changed = True
    while changed:
        changed = False
        for b in rpo[1:]:
            new = None
            for p in pred[b]:
                if p not in idom:
                    continue
                if new is None:
                    new = p
                    continue
                x, y = p, new
                while x != y:
                    while index[x] > index[y]:
                        x = idom[x]
                    while index[y] > index[x]:
                        y = idom[y]
                new = x
            if idom.get(b) != new:
                idom[b] = new
                changed = True
    return idom


def loops_of(sass):
    """Natural loops: for every back edge u -> h (h dominates u), the blocks
    that reach u without passing h, and h; smallest first. Branches to lower
    addresses that are not back edges (out-of-line code jumping back) are
    not loops."""
    blocks, succ = blocks_of(sass)
    idom = dominators(succ)
    pred = [[] for _ in blocks]
    for k, out in enumerate(succ):
        for t in out:
            pred[t].append(k)

    def dominates(h, u):
        while True:
            if u == h:
                return True
            if u == 0 or u not in idom:
                return False
            u = idom[u]

    loops = set()
    for k, out in enumerate(succ):
        if k not in idom:
            continue
        for h in out:
            if dominates(h, k):
                body = {h}
                stack = [k]
                while stack:
                    x = stack.pop()
                    if x not in body:
                        body.add(x)
                        stack.extend(pred[x])
                loops.add(frozenset(body))
    return blocks, sorted(loops, key=lambda loop: (len(loop), min(loop)))


def main_loop(sass, loop_file=None):
    """The loop whose own body (not counting loops nested in it) loads the
    most bytes from global memory per iteration (ties: more load
    instructions, then the smaller loop), among the loops whose own body holds
    code of `loop_file` where given: the body's instructions in program
    order, or None when no such loop loads from global memory."""
    blocks, loops = loops_of(sass)
    own = {loop: [0, 0, loop_file is None] for loop in loops}  # bytes, load instructions, holds loop_file
    for k, (first, last) in enumerate(blocks):
        inner = next((loop for loop in loops if k in loop), None)  # the smallest loop holding block k
        if inner is None:
            continue
        for i in sass.instrs[first:last + 1]:
            own[inner][2] |= i.file == loop_file
            w = load_width(i)
            if w is not None:
                own[inner][0] += w
                own[inner][1] += 1
    loops = [loop for loop in loops if own[loop][2]]
    if not loops:
        return None
    best = max(loops, key=lambda loop: (own[loop][0], own[loop][1], -len(loop)))
    if own[best][0] == 0:
        return None
    return [i for k in sorted(best) for i in sass.instrs[blocks[k][0]:blocks[k][1] + 1]]


def regs_of(args):
    regs = set()
    for m in REG.finditer(args):
        n = int(m.group(1))
        regs.update((n, n + 1) if m.group(2) else (n,))
    return regs


def in_flight16(body):
    """The largest number of 16-byte global loads a thread has issued and not
    yet waited for, over the main loop's body in program order.

    An LDG.128 is in flight from its issue until the first later instruction
    that names one of its four destination registers (reading or overwriting
    them waits on the load's scoreboard). A 16-byte cp.async (LDGSTS.128) is
    in flight until a DEPBAR.LE SB0, N retires its commit group (LDGDEPBAR
    closes a group; N groups stay in flight). The body is walked again with
    what the last walk left in flight, until that repeats (at most MAX_WALKS
    walks), so that loads issued in one iteration for a later one count too.
    Branches inside the body are ignored: it is a static, straight-line
    estimate of the memory-level parallelism the code asks for, not a
    simulation."""
    return max((n for _, n in flight_trace(body)), default=0)


def in_flight_grows(body):
    """Whether the loads in flight still grow after MAX_WALKS walks: a loop
    that issues cp.async copies and waits for them only after it (a tile
    staging loop) keeps one more group in flight per iteration."""
    states = [n for ins, n in flight_trace(body) if ins is body[-1]]
    return len(states) == MAX_WALKS and states[-1] > states[-2]


def flight_trace(body, walks=MAX_WALKS):
    """(instruction, 16-byte loads in flight after it) along in_flight16's walks."""
    pending = []  # register sets of in-flight LDG.128
    open_group = 0  # LDGSTS.128 issued since the last LDGDEPBAR
    groups = []  # committed cp.async groups, oldest first: count of 16-byte copies
    seen = set()
    for _ in range(walks):
        state = (tuple(sorted(tuple(sorted(p)) for p in pending)), open_group, tuple(groups))
        if state in seen:
            return
        seen.add(state)
        for ins in body:
            used = regs_of(ins.args)
            pending = [p for p in pending if not (p & used)]
            base = ins.op.split(".")[0]
            if base == "LDGDEPBAR":
                groups.append(open_group)
                open_group = 0
            elif base == "DEPBAR":
                m = re.search(r"SB0\s*,\s*(0x[0-9a-f]+|\d+)", ins.args)
                keep = int(m.group(1), 0) if m else 0
                groups = groups[len(groups) - keep:] if keep else []
            w = load_width(ins)
            if w == 16 and base in ("LDG", "LD"):
                dst = re.match(r"R(\d+)", ins.args)
                if dst:
                    n = int(dst.group(1))
                    pending.append({n, n + 1, n + 2, n + 3})
            elif w == 16 and base == "LDGSTS":
                open_group += 1
            yield ins, len(pending) + open_group + sum(groups)


@dataclass
class SassFigures:
    loads: dict = field(default_factory=dict)  # width -> count (LDG and generic LD)
    cp_async: dict = field(default_factory=dict)  # width -> count (LDGSTS)
    mma: dict = field(default_factory=dict)  # opcode -> count
    loop_loads: dict | None = None  # width -> count in the main loop, None: no loop with loads
    loop_instrs: int = 0  # instructions in the main loop's body
    in_flight16: int = 0
    in_flight_grows: bool = False  # still growing after MAX_WALKS walks


def sass_figures(sass, loop_file=None):
    f = SassFigures()
    for ins in sass.instrs:
        w = load_width(ins)
        base = ins.op.split(".")[0]
        if w is not None:
            target = f.cp_async if base == "LDGSTS" else f.loads
            target[w] = target.get(w, 0) + 1
        if base in ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "DMMA"):
            f.mma[base] = f.mma.get(base, 0) + 1
    body = main_loop(sass, loop_file)
    if body is not None:
        f.loop_loads = {}
        for ins in body:
            w = load_width(ins)
            if w is not None:
                f.loop_loads[w] = f.loop_loads.get(w, 0) + 1
        f.loop_instrs = len(body)
        f.in_flight16 = in_flight16(body)
        f.in_flight_grows = in_flight_grows(body)
    return f


# ---------------------------------------------------------------- compile


@dataclass
class Instance:
    op: str
    name: str
    arch: str
    res: Resources
    sass: SassFigures

    @property
    def key(self):
        return f"{self.op}/{self.name}"


def compile_one(src, arch, tmp, nvcc, nvdisasm):
    """nvcc -cubin with the resource report, then nvdisasm: (ptxas log, SASS)."""
    stem = Path(src).stem
    cubin = Path(tmp) / f"{stem}.sm_{arch}.cubin"
    cmd = [nvcc, "-cubin", *NVCC_FLAGS, "-lineinfo", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas", "-v",
           src, "-o", str(cubin)]
    p = subprocess.run(cmd, cwd=KERNELS, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"kernel-report: nvcc failed on {src} for sm_{arch}:\n{p.stderr}")
    d = subprocess.run([nvdisasm, "-c", "-g", str(cubin)], capture_output=True, text=True)
    if d.returncode != 0:
        raise SystemExit(f"kernel-report: nvdisasm failed on {cubin}:\n{d.stderr}")
    return p.stderr + p.stdout, d.stdout


def collect(sources, archs, jobs):
    nvcc = shutil.which("nvcc")
    nvdisasm = shutil.which("nvdisasm")
    if not nvcc or not nvdisasm:
        raise SystemExit("kernel-report: nvcc and nvdisasm must be on PATH: "
                         'scripts/install-cuda.sh, then eval "$(scripts/install-cuda.sh --env)"')
    # Largest sources first: the longest compiles start at once.
    tasks = sorted(((s, a) for s in sources for a in archs), key=lambda t: -(KERNELS / t[0]).stat().st_size)
    with tempfile.TemporaryDirectory(prefix="kernel-report-") as tmp, ThreadPoolExecutor(jobs) as pool:
        futures = {t: pool.submit(compile_one, t[0], t[1], tmp, nvcc, nvdisasm) for t in tasks}
        results = {t: f.result() for t, f in futures.items()}
    mangled = sorted({n for log, _ in results.values() for n in parse_ptxas(log)})
    names = demangle(mangled)
    instances = []
    for (src, arch), (log, sass_text) in results.items():
        res = parse_ptxas(log)
        sass = split_sass(sass_text)
        for mname, r in res.items():
            op, name = Path(src).stem, short_name(names[mname])
            fig = sass_figures(sass.get(mname, Sass()), expectation(op, name)[2])
            instances.append(Instance(op, name, f"sm_{arch}", r, fig))
    order = {Path(s).stem: i for i, s in enumerate(sources)}
    instances.sort(key=lambda i: (order[i.op], natural(i.name), i.arch))
    return instances, results


def natural(name):
    """Sort key: numbers by value (`k<bf16,64,8>` before `k<bf16,128,1>`)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", name)]


# ---------------------------------------------------------------- checks


def expectation(op, name):
    """The MEMORY_BOUND entry of an instance, or a row of Nones."""
    return next((e for e in MEMORY_BOUND if e[0] == op and re.match(e[1], name)), (None,) * 5)


def parse_known(text):
    """scripts/kernel-report-known.txt: `CHECK ARCH OP/INSTANCE issue N: reason` lines."""
    known = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 3)
        if len(parts) < 4 or parts[0] not in ("spill", "vec16") or not re.match(r"issue \d+\b", parts[3]):
            raise SystemExit(f"kernel-report: {KNOWN.name}:{n}: expected `spill|vec16 sm_XX op/instance "
                             f"issue N: reason`, got: {line}")
        known[(parts[0], parts[1], parts[2])] = parts[3]
    return known


def failures(instances, ops):
    """(check, arch, op/instance, message) for every spill and every missed
    16-byte-load expectation; plus expectations of the compiled `ops` that
    match no instance."""
    out = []
    for i in instances:
        if i.res.spill_stores or i.res.spill_loads:
            out.append(("spill", i.arch, i.key,
                        f"{i.res.spill_stores} bytes spill stores, {i.res.spill_loads} bytes spill loads"))
    for op, pattern, _, need, why in MEMORY_BOUND:
        if op not in ops:
            continue
        matched = [i for i in instances if i.op == op and re.match(pattern, i.name)]
        if not matched:
            out.append(("vec16", "*", f"{op}/{pattern}", "this MEMORY_BOUND entry matches no kernel instance "
                        "(renamed? update MEMORY_BOUND in scripts/kernel-report.py)"))
        for i in matched:
            if i.sass.in_flight16 < need:
                what = "no main loop with global loads" if i.sass.loop_loads is None else \
                    f"main loop loads {fmt_widths(i.sass.loop_loads)}, {i.sass.in_flight16} 16-byte in flight"
                out.append(("vec16", i.arch, i.key, f"{what}; needs >= {need} 16-byte loads in flight: {why}"))
    return out


# ---------------------------------------------------------------- doc


def fmt_widths(d):
    return " · ".join(f"{w}B×{d[w]}" for w in sorted(d, reverse=True)) if d else "—"


def render(instances, sources, archs):
    lines = [
        "# Kernel report",
        "",
        "What the compiler made of every kernel instance: written by",
        "`scripts/kernel-report.py` (do not edit by hand). Regenerate after any kernel",
        "change with",
        "",
        "```sh",
        'eval "$(scripts/install-cuda.sh --env)"',
        "python3 scripts/kernel-report.py",
        "```",
        "",
        "(`--only OP` checks one op without writing this file; `--show-loop",
        "'OP/INSTANCE'` prints an instance's main loop in SASS with the loads in flight.)",
        "",
        "CI runs it with `--check-doc`: it fails when an instance spills registers, when a",
        "memory-bound kernel (the script's MEMORY_BOUND table) keeps too few 16-byte",
        "loads in flight in its main loop, or when this file is stale. Known, owed",
        "exceptions are listed, each with the issue that owes its fix, in",
        "`scripts/kernel-report-known.txt`.",
        "",
        f"Sources: kernels-cuda/build.rs's SOURCES; architectures: {', '.join('sm_' + a for a in archs)}",
        "(build.rs's defaults); the pinned CUDA 13.0 nvcc with build.rs's flags plus",
        "`-Xptxas -v` and `-lineinfo` (line info only: the SASS is the same); SASS by",
        "nvdisasm.",
        "",
        "Columns:",
        "- **regs**: registers per thread (ptxas).",
        "- **spill st/ld**: bytes of spill stores / spill loads per thread (ptxas); must be 0.",
        "- **stack**: stack frame bytes per thread (spills and local arrays).",
        "- **smem**: static shared memory per block, bytes (dynamic shared memory is",
        "  set at launch and not counted).",
        "- **16B loads**: global loads of 16 bytes in the whole kernel (LDG.128 and",
        "  16-byte cp.async), static instruction count.",
        "- **other loads**: the kernel's other global loads by width (LDG, generic LD),",
        "  e.g. `4B×3` = three 4-byte load instructions.",
        "- **main loop**: the global loads of the main loop by width: the loop whose",
        "  own body (loops nested in it not counted) loads the most bytes per",
        "  iteration (ties: more load instructions, then the smaller loop), found on",
        "  the control-flow graph (natural loops: back edges to a dominating block); for a",
        "  kernel whose MEMORY_BOUND entry names a source file, among the loops holding",
        "  code of that file (gaze's attend loop in gaze_attend.cuh, not its routing or",
        "  merge loops). `—`: no loop loads from global memory.",
        "- **loop instrs**: SASS instructions in the main loop's body (all its blocks,",
        "  cold paths included): with the main loop's loads, the instructions issued",
        "  per byte moved.",
        "- **in flight**: the most 16-byte global loads the main loop has issued and",
        "  not yet waited for, per thread, walking its body in program order (again",
        "  with what is left in flight, until that repeats, for pipelined loops): an",
        "  LDG.128 is waited for at the first later instruction naming one of its",
        "  destination registers; a 16-byte cp.async when a DEPBAR retires its group.",
        "  A static estimate of memory-level parallelism (branches ignored). `8+`: still",
        "  growing after 8 walks (a loop issuing cp.async copies it waits for after the",
        "  loop: one more per iteration).",
        "- **mma**: tensor-core instructions (HMMA, HGMMA, ...), static count.",
        "- **cp.async**: LDGSTS instructions by width.",
        "",
    ]
    by_op = {}
    for i in instances:
        by_op.setdefault(i.op, []).append(i)
    for src in sources:
        op = Path(src).stem
        rows = by_op.get(op, [])
        lines += [f"## {op}", ""]
        if not rows:
            lines += ["No kernel (host code only).", ""]
            continue
        lines += [
            "| instance | arch | regs | spill st/ld | stack | smem | 16B loads | other loads | main loop | loop instrs "
            "| in flight | mma | cp.async |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for i in rows:
            r, s = i.res, i.sass
            name = f"`{i.name}`" + ("" if r.entry else " (device function)")
            wide = s.loads.get(16, 0) + s.cp_async.get(16, 0)
            other = {w: c for w, c in s.loads.items() if w != 16}
            loop, instrs = ("—", "—") if s.loop_loads is None else (fmt_widths(s.loop_loads), str(s.loop_instrs))
            mma = " · ".join(f"{k}×{v}" for k, v in sorted(s.mma.items())) or "—"
            regs = str(r.registers) if r.entry else "—"
            flight = f"{s.in_flight16}{'+' if s.in_flight_grows else ''}"
            lines.append(f"| {name} | {i.arch} | {regs} | {r.spill_stores}/{r.spill_loads} | {r.stack} | {r.smem} | "
                         f"{wide} | {fmt_widths(other)} | {loop} | {instrs} | {flight} | {mma} | "
                         f"{fmt_widths(s.cp_async)} |")
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def run(args):
    start = time.monotonic()
    build_rs = BUILD_RS.read_text()
    sources = build_rs_sources(build_rs)
    archs = build_rs_archs(build_rs)
    if args.show_loop:
        op = args.show_loop.split("/")[0]
        _, results = collect([s for s in sources if Path(s).stem == op], archs, args.jobs)
        return show_loop(args.show_loop, results)
    if args.only:
        unknown = set(args.only) - {Path(s).stem for s in sources}
        if unknown:
            raise SystemExit(f"kernel-report: --only {' '.join(sorted(unknown))}: not in build.rs's SOURCES")
        sources = [s for s in sources if Path(s).stem in args.only]
    instances, _ = collect(sources, archs, args.jobs)
    status = 0
    if not args.only:
        doc = render(instances, sources, archs) + "\n"
        if args.check_doc and (not DOC.is_file() or DOC.read_text() != doc):
            print("kernel-report: docs/kernels.md is stale: regenerate it with `python3 scripts/kernel-report.py` "
                  "and commit it", file=sys.stderr)
            status = 1
        DOC.write_text(doc)

    known = parse_known(KNOWN.read_text() if KNOWN.is_file() else "")
    ops = {Path(s).stem for s in sources}
    found = failures(instances, ops)
    new, stale = judge(found, known, ops)
    for check, arch, key, msg in new:
        print(f"kernel-report: FAIL {check} {arch} {key}: {msg}", file=sys.stderr)
    for check, arch, key in stale:
        print(f"kernel-report: FAIL {check} {arch} {key} is listed in {KNOWN.name} ({known[(check, arch, key)]}) "
              "but no longer fails: remove its line", file=sys.stderr)
    wrote = "" if args.only else f"; wrote {DOC.relative_to(ROOT)}"
    print(f"kernel-report: {len(instances)} kernel instances ({len(sources)} sources x {len(archs)} architectures), "
          f"{len(found) - len(new)} known exceptions, {len(new)} new failures, {len(stale)} stale exceptions"
          f"{wrote} in {time.monotonic() - start:.0f} s")
    return 1 if new or stale else status


def judge(found, known, ops):
    """The failures the allow-list does not list, and its lines (of the ops
    compiled) that no longer fail."""
    new = [f for f in found if (f[0], f[1], f[2]) not in known]
    failing = {(f[0], f[1], f[2]) for f in found}
    stale = sorted(k for k in known if k not in failing and k[2].split("/")[0] in ops)
    return new, stale


def show_loop(key, results):
    """Prints the main loop's SASS of instance `op/name` on every architecture,
    each instruction with the 16-byte loads in flight after it (two walks)."""
    shown = 0
    for (src, arch), (_, sass_text) in results.items():
        if Path(src).stem != key.split("/")[0]:
            continue
        sass = split_sass(sass_text)
        names = demangle(sorted(sass))
        for mname, code in sass.items():
            if f"{Path(src).stem}/{short_name(names[mname])}" != key:
                continue
            body = main_loop(code, expectation(*key.split("/", 1))[2])
            print(f"== {key} sm_{arch}: main loop " + ("none" if body is None else
                  f"{body[0].addr:#06x}..{body[-1].addr:#06x}, {in_flight16(body)} 16-byte loads in flight"))
            for ins, n in flight_trace(body or [], walks=2):
                print(f"  [{n:2d}] /*{ins.addr:04x}*/ {ins.op} {ins.args}")
            shown += 1
    if not shown:
        print(f"kernel-report: no instance {key} (names as in docs/kernels.md: op/instance)", file=sys.stderr)
        return 1
    return 0


def self_test():
    """The parsers and the in-flight measure on made-up compiler output."""
    log = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kv' for 'sm_90a'
ptxas info    : Function properties for _Z1kv
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 8 bytes cumulative stack size, 23488 bytes smem
ptxas info    : Function properties for _Z3devv
    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
"""
    res = parse_ptxas(log)
    assert res["_Z1kv"] == Resources(True, 168, 8, 4, 12, 23488), res
    assert res["_Z3devv"] == Resources(False, 0, 16, 0, 0, 0), res
    assert short_name("void foveal::(anonymous namespace)::k<__nv_bfloat16, 128, 8>(foveal_p)") == "k<bf16,128,8>"
    assert short_name("foveal::(anonymous namespace)::g<unsigned char>(foveal_gather_params, int)") == "g<uint8_t>"
    assert short_name("foveal::(anonymous namespace)::plan_kernel(foveal_p)") == "plan_kernel"
    assert build_rs_sources('const SOURCES: &[&str] = &[\n "src/a.cu",\n "src/b.cu",\n];') == ["src/a.cu", "src/b.cu"]
    assert build_rs_archs('for arch in env_list("FOVEAL_CUDA_ARCHS", "80,90a") {') == ["80", "90a"]

    def sass(body):
        return split_sass(".text._Z1kv:\n" + body)["_Z1kv"]

    # A loop of four 16-byte loads issued before the first use, with an outer loop
    # around it and a 2-byte load outside both.
    two_deep = sass("""        /*0000*/                   LDG.E.U16 R2, desc[UR4][R2.64] ;
.L_x_0:
        /*0010*/                   IADD3 R3, R3, 0x1, RZ ;
.L_x_1:
        /*0020*/                   LDG.E.128.CONSTANT R4, desc[UR4][R20.64] ;
        /*0030*/                   LDG.E.128.CONSTANT R8, desc[UR4][R20.64+0x10] ;
        /*0040*/               @P0 LDG.E.128.CONSTANT R12, desc[UR4][R20.64+0x20] ;
        /*0050*/                   LDG.E.128 R16, desc[UR4][R20.64+0x30] ;
        /*0060*/                   FADD R0, R5, R0 ;
        /*0070*/                   FADD R0, R8, R0 ;
        /*0080*/              @!P1 BRA `(.L_x_1) ;
        /*0090*/                   LDG.E R22, desc[UR4][R24.64] ;
        /*00a0*/               @P2 BRA `(.L_x_0) ;
        /*00b0*/                   EXIT ;
""")
    f = sass_figures(two_deep)
    assert f.loads == {2: 1, 16: 4, 4: 1}, f.loads
    assert f.loop_loads == {16: 4} and f.loop_instrs == 7, f
    assert f.in_flight16 == 4, f.in_flight16
    # Each load used at once: one in flight.
    serial = sass(""".L_x_0:
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R0, R4, R0 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64+0x10] ;
        /*0030*/                   FADD R0, R7, R0 ;
        /*0040*/                   LDG.E.U16 R9, desc[UR4][R10.64] ;
        /*0050*/                   BRA `(.L_x_0) ;
""")
    f = sass_figures(serial)
    assert f.in_flight16 == 1 and f.loop_loads == {16: 2, 2: 1}, f
    # Scalar loads only: nothing in flight.
    scalar = sass(""".L_x_0:
        /*0000*/                   LDG.E.U16 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.U16 R5, desc[UR4][R2.64+0x2] ;
        /*0020*/                   BRA `(.L_x_0) ;
""")
    assert sass_figures(scalar).in_flight16 == 0
    # Software pipelining: the loads at the end of the body are used at the top
    # of the next iteration (the second walk counts them).
    pipelined = sass(""".L_x_0:
        /*0000*/                   FADD R0, R4, R0 ;
        /*0010*/                   FADD R0, R8, R0 ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0040*/                   BRA `(.L_x_0) ;
""")
    assert sass_figures(pipelined).in_flight16 == 2
    # A 3-stage cp.async pipeline: two groups of two copies stay in flight
    # while the third is issued.
    cp_async = sass(""".L_x_0:
        /*0000*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0010*/                   LDGSTS.E.BYPASS.128 [R3+0x10], desc[UR4][R4.64+0x10] ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   DEPBAR.LE SB0, 0x2 ;
        /*0040*/                   HMMA.16816.F32.BF16 R8, R12, R16, R8 ;
        /*0050*/                   BRA `(.L_x_0) ;
""")
    f = sass_figures(cp_async)
    assert f.in_flight16 == 6 and f.cp_async == {16: 2} and f.mma == {"HMMA": 1}, f
    # A loop whose cold path lies after it (out of line, jumping back in): the
    # cold block is in the loop; the jump back to the loop's middle is no loop.
    cold = sass("""        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0020*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0030*/                   FADD R0, R4, R0 ;
        /*0040*/               @P1 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
.L_x_1:
        /*0060*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0070*/                   LDG.E.128 R12, desc[UR4][R2.64+0x20] ;
        /*0080*/                   FADD R4, R8, R12 ;
        /*0090*/                   BRA `(.L_x_2) ;
""")
    blocks, loops = loops_of(cold)
    assert len(loops) == 1, loops
    f = sass_figures(cold)
    assert f.loop_loads == {16: 3} and f.in_flight16 == 2, f
    # loop_file picks among loops by the code's source file.
    two = split_sass(""".text._Z1kv:
.L_x_0:
	//## File "/src/attend.cuh", line 10
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   FADD R0, R4, R0 ;
        /*0020*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
	//## File "/src/route.cu", line 20
        /*0030*/                   LDG.E R5, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E R6, desc[UR4][R2.64+0x4] ;
        /*0050*/                   LDG.E R7, desc[UR4][R2.64+0x8] ;
        /*0060*/                   LDG.E R8, desc[UR4][R2.64+0xc] ;
        /*0070*/                   LDG.E R9, desc[UR4][R2.64+0x10] ;
        /*0080*/               @P1 BRA `(.L_x_1) ;
        /*0090*/                   EXIT ;
""")["_Z1kv"]
    assert sass_figures(two).loop_loads == {4: 5}
    assert sass_figures(two, "attend.cuh").loop_loads == {16: 1}
    assert sass_figures(two, "other.cuh").loop_loads is None
    # A staging loop: cp.async copies, waited for after the loop: grows.
    staging = sass(""".L_x_0:
        /*0000*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R4.64] ;
        /*0010*/               @P0 BRA `(.L_x_0) ;
        /*0020*/                   LDGDEPBAR ;
        /*0030*/                   DEPBAR.LE SB0, 0x0 ;
        /*0040*/                   EXIT ;
""")
    f = sass_figures(staging)
    assert f.in_flight16 == MAX_WALKS and f.in_flight_grows, f
    assert not sass_figures(cp_async).in_flight_grows and not sass_figures(pipelined).in_flight_grows
    # No loop: no main loop.
    straight = sass("        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;\n")
    assert sass_figures(straight).loop_loads is None

    # The checks: a spill and a missed expectation fail; the allow-list takes
    # them. (On a table of the test's own, whatever the real one names.)
    global MEMORY_BOUND
    real, MEMORY_BOUND = MEMORY_BOUND, [("window_mean", r"window_mean_kernel<", None, 1, "test"),
                                        ("compact_kv", r"gather_positions_kernel<uint4>", None, 1, "test")]
    try:
        checks_self_test(scalar)
    finally:
        MEMORY_BOUND = real
    print("kernel-report self-test: 1 passed, 0 failed")


def checks_self_test(scalar):
    """self_test's part on failures, render, parse_known and judge."""
    inst = [Instance("window_mean", "window_mean_kernel<bf16>", "sm_90a", Resources(True, 40, 8, 4, 4, 0),
                     sass_figures(scalar))]
    found = failures(inst, {op for op, *_ in MEMORY_BOUND})
    keys = {(c, a, k) for c, a, k, _ in found}
    assert ("spill", "sm_90a", "window_mean/window_mean_kernel<bf16>") in keys, found
    assert ("vec16", "sm_90a", "window_mean/window_mean_kernel<bf16>") in keys, found
    assert any(k[2].startswith("compact_kv/") and k[1] == "*" for k in keys), "unmatched entries fail"
    table = [line for line in render(inst, ["src/window_mean.cu"], ["80"]).splitlines() if line.startswith("|")]
    assert len(table) == 3 and len({line.count("|") for line in table}) == 1, table
    known = parse_known("# comment\nspill sm_90a window_mean/window_mean_kernel<bf16> issue 11: owed\n")
    assert known == {("spill", "sm_90a", "window_mean/window_mean_kernel<bf16>"): "issue 11: owed"}
    # A listed failure passes, an unlisted one fails, a listed pass is stale
    # (only for the ops compiled).
    known = parse_known("spill sm_90a window_mean/window_mean_kernel<bf16> issue 11: owed\n"
                        "spill sm_80 window_mean/window_mean_kernel<f16> issue 11: fixed since\n"
                        "spill sm_80 compact_kv/gather_positions_kernel<uint4> issue 11: not compiled here\n")
    new, stale = judge(failures(inst, {"window_mean"}), known, {"window_mean"})
    assert [(c, a, k) for c, a, k, _ in new] == [("vec16", "sm_90a", "window_mean/window_mean_kernel<bf16>")], new
    assert stale == [("spill", "sm_80", "window_mean/window_mean_kernel<f16>")], stale
    try:
        parse_known("spill sm_90a window_mean/window_mean_kernel<bf16> no issue named\n")
        raise AssertionError("a line without its issue must be refused")
    except SystemExit:
        pass


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="nvcc processes at once (default: cores)")
    ap.add_argument("--check-doc", action="store_true", help="also fail if docs/kernels.md was not up to date")
    ap.add_argument("--show-loop", metavar="OP/INSTANCE",
                    help="print the main loop's SASS of one instance (e.g. window_mean/window_mean_kernel<bf16>), "
                         "with the 16-byte loads in flight after each instruction, and exit")
    ap.add_argument("--only", nargs="+", metavar="OP",
                    help="compile and check only these ops (source stems, e.g. window_mean); "
                         "docs/kernels.md is not written")
    ap.add_argument("--self-test", action="store_true", help="test the parsers on made-up output and exit")
    args = ap.parse_args()
    if args.self_test:
        self_test()
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
