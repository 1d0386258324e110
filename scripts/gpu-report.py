#!/usr/bin/env python3
"""Writes the committed record of one lent GPU session from the suite's logs.

    python3 scripts/gpu-report.py PHASE1_DIR [PHASE2_DIR] [--out FILE]
    python3 scripts/gpu-report.py --self-test   # (CI) on made-up logs

PHASE1_DIR and PHASE2_DIR are the folders the device tool returned for
`scripts/gpu-suite.sh phase1` and `phase2` (their $OUT). The record
(default docs/gpu-runs/DATE-GPU.md, DATE and GPU read from the logs) holds:
the GPU and driver, the commit that ran, each test binary's pass / fail /
ignored counts and each op's or method's result (its module in the binary),
each sanitizer tool's error count, the step summary, the benchmark table and
the PyTorch baselines. Nothing in it is typed by hand: what a log lacks is
written as missing.
"""

import argparse
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

TEST_LINE = re.compile(r"^test (\S+) \.\.\. (ok|FAILED|ignored)")
RESULT_LINE = re.compile(r"^test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", re.M)
SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck")


def read(path):
    return path.read_text(errors="replace") if path.is_file() else None


def env_fields(text):
    fields = {}
    for line in (text or "").splitlines():
        key, sep, value = line.partition(": ")
        if sep and key in ("commit", "date", "gpu"):
            fields[key] = value.strip()
    return fields


def test_table(title, log):
    """Per module (op or method): passed / failed / ignored, from libtest's lines."""
    if log is None:
        return [f"### {title}", "", "log missing (the step did not run or its file did not come back)", ""]
    modules = OrderedDict()
    for line in log.splitlines():
        m = TEST_LINE.match(line)
        if m:
            name, status = m.groups()
            module = name.split("::")[0] if "::" in name else "(root)"
            counts = modules.setdefault(module, {"ok": 0, "FAILED": 0, "ignored": 0, "failed": []})
            counts[status] += 1
            if status == "FAILED":
                counts["failed"].append(name)
    totals = [0, 0, 0]
    for m in RESULT_LINE.finditer(log):
        for i in range(3):
            totals[i] += int(m.group(i + 1))
    skips = sum(1 for line in log.splitlines() if line.startswith("SKIP"))
    lines = [
        f"### {title}",
        "",
        f"{totals[0]} passed, {totals[1]} failed, {totals[2]} ignored, {skips} skipped"
        + ("" if totals[0] + totals[1] else " (no test ran)"),
        "",
        "| op / method | passed | failed | ignored | result |",
        "|---|---|---|---|---|",
    ]
    for module, c in modules.items():
        result = "pass" if c["FAILED"] == 0 and c["ok"] > 0 else ("FAIL" if c["FAILED"] else "none ran")
        lines.append(f"| {module} | {c['ok']} | {c['FAILED']} | {c['ignored']} | {result} |")
    failures = [n for c in modules.values() for n in c["failed"]]
    if failures:
        lines += ["", "Failed: " + ", ".join(f"`{n}`" for n in failures)]
    lines.append("")
    return lines


def sanitizer_table(phase2):
    lines = ["## compute-sanitizer", "", "| tool | tests passed | errors | note |", "|---|---|---|---|"]
    if phase2 is None:
        return lines[:2] + ["phase 2 did not run", ""]
    for tool in SANITIZER_TOOLS:
        log = read(phase2 / f"{tool}.log")
        if log is None:
            lines.append(f"| {tool} | - | - | log missing |")
            continue
        passed = sum(int(m.group(1)) for m in RESULT_LINE.finditer(log))
        errors = sum(int(x) for x in re.findall(r"ERROR SUMMARY: (\d+)", log))
        note = ""
        if re.search(r"not supported", log, re.I):
            note = "sanitizer refused on this machine"
        lines.append(f"| {tool} | {passed} | {errors} | {note} |")
    return lines + [""]


def summary_rows(text):
    return [line for line in (text or "").splitlines() if line.startswith("| ") and not line.startswith("| step")]


def torch_table(path):
    data = None
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except ValueError as e:
            return [f"{path.name} is not JSON: {e}", ""]
    # torch_baselines.py writes {"torch": version, "device": name, "cases": {key: {backend: us}}}.
    header = []
    if isinstance(data, dict) and "cases" in data:
        header = [f"torch {data.get('torch', '?')} on {data.get('device', '?')}", ""]
        data = data["cases"]
    if not data:
        return [f"{path.name}: missing or empty", ""]
    backends = sorted({b for v in data.values() if isinstance(v, dict) for b in v})
    lines = header + ["| case | " + " | ".join(f"{b} (us)" for b in backends) + " |",
             "|---|" + "---|" * len(backends)]
    for case, v in data.items():
        cells = [f"{v[b]:.2f}" if isinstance(v, dict) and isinstance(v.get(b), (int, float)) else "-" for b in backends]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines + [""]


def self_test():
    """Writes a record from made-up phase logs and checks what it says."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        p1, p2 = Path(tmp, "p1"), Path(tmp, "p2")
        p1.mkdir()
        p2.mkdir()
        (p1 / "env.txt").write_text("commit: abc123\ndate: 2026-12-01T00:00:00Z\ngpu: NVIDIA H200, 580.1, 143771 MiB, 1980 MHz\n")
        (p1 / "summary.md").write_text("| step | status | seconds | detail |\n|---|---|---|---|\n| ops-tests | FAILED | 12 | exit 101 |\n")
        (p1 / "tests.log").write_text(
            "test window_mean::matches_cpu_f32 ... ok\ntest window_mean::matches_cpu_f16 ... ok\n"
            "test select_keep::matches_cpu_on_random_cases ... FAILED\n"
            "test result: FAILED. 2 passed; 1 failed; 0 ignored; 0 measured; 0 filtered out\n")
        (p1 / "torch.json").write_text(json.dumps({"torch": "2.11.0", "device": "NVIDIA H200",
                                                    "cases": {"gaze_decode/b8": {"flash": 12.5, "cudnn": 10.25}}}))
        (p2 / "memcheck.log").write_text("test result: ok. 3 passed; 0 failed; 0 ignored\n========= ERROR SUMMARY: 2 errors\n")
        out = Path(tmp, "rec.md")
        sys.argv = ["gpu-report.py", str(p1), str(p2), "--out", str(out)]
        main()
        text = out.read_text()
        for want in ("# GPU run 2026-12-01: NVIDIA H200", "commit: abc123", "| 1 | ops-tests | FAILED | 12 | exit 101 |",
                     "2 passed, 1 failed, 0 ignored, 0 skipped", "| window_mean | 2 | 0 | 0 | pass |",
                     "| select_keep | 0 | 1 | 0 | FAIL |", "`select_keep::matches_cpu_on_random_cases`",
                     "| memcheck | 3 | 2 |  |", "| racecheck | - | - | log missing |",
                     "| gaze_decode/b8 | 10.25 | 12.50 |", "torch 2.11.0 on NVIDIA H200", "log missing (the step did not run"):
            assert want in text, f"self-test: {want!r} missing from the record:\n{text}"
    print("gpu-report.py self-test: ok")


def main():
    if sys.argv[1:] == ["--self-test"]:
        return self_test()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("phase1", type=Path)
    ap.add_argument("phase2", type=Path, nargs="?")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not (args.phase1 / "env.txt").is_file():
        sys.exit(f"gpu-report.py: {args.phase1}/env.txt is missing: is this a phase 1 folder?")
    env = env_fields(read(args.phase1 / "env.txt"))
    gpu = env.get("gpu", "unknown GPU")
    date = env.get("date", "unknown-date")[:10]
    gpu_name = re.sub(r"[^A-Za-z0-9]+", "-", gpu.split(",")[0]).strip("-") or "GPU"
    out = args.out or Path("docs/gpu-runs") / f"{date}-{gpu_name}.md"

    lines = [f"# GPU run {date}: {gpu.split(',')[0]}", "",
             "Written by scripts/gpu-report.py from the logs of scripts/gpu-suite.sh; not edited by hand.", "",
             f"- GPU (name, driver, memory, max SM clock): {gpu}",
             f"- commit: {env.get('commit', 'unknown')}",
             f"- date: {env.get('date', 'unknown')}", "",
             "## Steps", "", "| phase | step | status | seconds | detail |", "|---|---|---|---|---|"]
    for phase, folder in (("1", args.phase1), ("2", args.phase2)):
        if folder is None:
            continue
        for row in summary_rows(read(folder / "summary.md")):
            lines.append(f"| {phase} {row}")
    lines += ["", "## Tests", ""]
    lines += test_table("Ops (tests/tests/gpu, binary test-ops)", read(args.phase1 / "tests.log"))
    lines += test_table("Methods, whole models (integration/tests/gpu, binary test-models)", read(args.phase1 / "models.log"))
    lines += sanitizer_table(args.phase2)
    for title, folder, table, torch in (("Benchmark, quick mode (phase 1)", args.phase1, "bench.md", "torch.json"),
                                        ("Benchmark, full sizes (phase 2)", args.phase2, "bench-full.md", "torch-full.json")):
        if folder is None:
            continue
        lines += [f"## {title}", ""]
        text = read(folder / table)
        lines += [text.strip() if text else f"{table} missing", ""]
        lines += [f"### PyTorch baselines ({torch})", ""] + torch_table(folder / torch)
    main_log = read(args.phase1 / "main.log")
    lines += ["## Main job on the GPU (last 40 lines)", "", "```text"]
    lines += (main_log or "main.log missing").splitlines()[-40:]
    lines += ["```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines))
    print(out)


if __name__ == "__main__":
    main()
