"""Registers, spills and shared memory of every CUDA kernel, from `nvcc -Xptxas=-v` output.

    python scripts/ptxas_report.py BUILD_LOG [--expect-archs sm_80,sm_90a] [--expect-kernels N]

Prints one row per (kernel, architecture) and exits non-zero when any kernel spills
(spill stores or loads > 0), when no kernel was found, or when a kernel is missing for one
of the expected architectures. ptxas prints, per kernel and architecture:

    ptxas info    : Compiling entry function '_Z...' for 'sm_80'
    ptxas info    : Function properties for _Z...
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 228 registers, used 1 barriers, 42624 bytes smem, 1064 bytes cmem[0]
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def demangle(names):
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out)) if len(out) == len(names) else {n: n for n in names}


def short(name: str) -> str:
    """metaembed::cuda::(anonymous namespace)::score_kernel<metaembed::...::bf16s>(...) -> score_kernel<bf16>"""
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\([^()]*\)$", "", name)  # the parameter list
    name = re.sub(r"^void ", "", name)
    name = name.replace("metaembed::cuda::", "")
    return name.replace("bf16s", "bf16").replace("f16s", "f16").replace("<float>", "<f32>")


def parse(text: str):
    rows, cur = [], None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = dict(mangled=m.group(1), arch=m.group(2), regs=None, smem=0, stack=0, spill_st=0, spill_ld=0)
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(g) for g in m.groups())
            continue
        m = USED.search(line)
        if m and cur["regs"] is None:
            cur["regs"] = int(m.group(1))
            cur["smem"] = int(m.group(3) or 0)
    # ptxas runs once per object file; a rebuilt object repeats its kernels: keep the last.
    unique = {}
    for r in rows:
        unique[(r["mangled"], r["arch"])] = r
    return list(unique.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--expect-archs", default="", help="comma-separated, e.g. sm_80,sm_90a")
    ap.add_argument("--expect-kernels", type=int, default=0, help="distinct kernels expected per arch")
    args = ap.parse_args()
    rows = parse(open(args.log, errors="replace").read())
    if not rows:
        print("ptxas report: no kernels found in the build log (was kernels.cu compiled with -Xptxas=-v?)")
        return 1
    names = demangle(sorted({r["mangled"] for r in rows}))
    for r in rows:
        r["name"] = short(names[r["mangled"]])
    rows.sort(key=lambda r: (r["name"], r["arch"]))
    width = max(len(r["name"]) for r in rows)
    header = f"{'kernel':{width}}  {'arch':7} {'regs':>5} {'smem B':>7} {'stack B':>7} {'spill st':>8} {'spill ld':>8}"
    print(header)
    print("-" * len(header))
    bad = []
    for r in rows:
        flag = "  <-- SPILL" if r["spill_st"] or r["spill_ld"] else ""
        print(f"{r['name']:{width}}  {r['arch']:7} {r['regs'] or 0:>5} {r['smem']:>7} {r['stack']:>7} "
              f"{r['spill_st']:>8} {r['spill_ld']:>8}{flag}")
        if flag:
            bad.append(f"{r['name']} ({r['arch']})")
    archs = sorted({r["arch"] for r in rows})
    status = 0
    for arch in filter(None, args.expect_archs.split(",")):
        n = sum(r["arch"] == arch for r in rows)
        if n == 0 or (args.expect_kernels and n != args.expect_kernels):
            print(f"ptxas report: expected {args.expect_kernels or '>0'} kernels for {arch}, found {n}")
            status = 1
    print(f"ptxas report: {len(rows)} kernel builds, archs {', '.join(archs)}, "
          f"max registers {max(r['regs'] or 0 for r in rows)}, spilling: {', '.join(bad) or 'none'}")
    return 1 if bad else status


if __name__ == "__main__":
    sys.exit(main())
