#!/usr/bin/env python3
"""Where a JIT-compiled BPF program spends its time, by source line.

No PMU in a VM means no `bpftool prog profile`, and bpftool built without
libbfd cannot disassemble JIT code. This maps cpu-clock samples to source
lines instead, through the program's own line info (the JIT records the
address of each line's first instruction).

    perf record -g -e cpu-clock -F 10000 -C 1 -o dp.data -- \\
        taskset -c 1 tagflow-lab bench datapath --repeat 1000000 --rounds 5
    perf script -i dp.data -F ip,sym,symoff | awk 'BEGIN{RS="";FS="\\n"}{print $1}' > leaf.txt
    # with the same program loaded again (e.g. the bench re-run in the background):
    bpf_line_profile.py tagflow_ingress leaf.txt [top N]

The program is identified by name; its JIT layout must match the profiled
one (same object, same kernel). Needs root and bpftool (xlated dump).
"""
import bisect
import collections
import ctypes
import re
import struct
import subprocess
import sys

SYS_BPF = 321  # x86-64
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15
INFO_LEN = 232  # struct bpf_prog_info up to attach_btf_id

libc = ctypes.CDLL(None, use_errno=True)


def prog_fd(prog_id):
    buf = ctypes.create_string_buffer(struct.pack("I", prog_id), 128)
    fd = libc.syscall(SYS_BPF, BPF_PROG_GET_FD_BY_ID, buf, 128)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "BPF_PROG_GET_FD_BY_ID")
    return fd


def prog_info(fd, info):
    attr = ctypes.create_string_buffer(struct.pack("IIQ", fd, INFO_LEN, ctypes.addressof(info)), 128)
    if libc.syscall(SYS_BPF, BPF_OBJ_GET_INFO_BY_FD, attr, 128) < 0:
        raise OSError(ctypes.get_errno(), "BPF_OBJ_GET_INFO_BY_FD")


def main():
    name, samples = sys.argv[1], sys.argv[2]
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 30
    prog_id = int(subprocess.check_output(["bpftool", "prog", "show", "name", name], text=True).split(":")[0])
    fd = prog_fd(prog_id)
    info = ctypes.create_string_buffer(INFO_LEN)
    prog_info(fd, info)
    nksyms = struct.unpack_from("I", info, 104)[0]
    nr_line = struct.unpack_from("I", info, 148)[0]
    nr_jline = struct.unpack_from("I", info, 168)[0]
    lrec, jrec = struct.unpack_from("II", info, 172)
    ksyms = ctypes.create_string_buffer(nksyms * 8)
    lines = ctypes.create_string_buffer(nr_line * lrec)
    jlines = ctypes.create_string_buffer(nr_jline * jrec)
    info = ctypes.create_string_buffer(INFO_LEN)
    struct.pack_into("I", info, 104, nksyms)
    struct.pack_into("Q", info, 112, ctypes.addressof(ksyms))
    struct.pack_into("I", info, 148, nr_line)
    struct.pack_into("Q", info, 152, ctypes.addressof(lines))
    struct.pack_into("Q", info, 160, ctypes.addressof(jlines))
    struct.pack_into("III", info, 168, nr_jline, lrec, jrec)
    prog_info(fd, info)
    start = struct.unpack_from("Q", ksyms.raw, 0)[0]
    # (offset in the JIT image, xlated instruction) of each line's start
    recs = sorted(
        (struct.unpack_from("Q", jlines.raw, i * jrec)[0] - start, struct.unpack_from("I", lines.raw, i * lrec)[0])
        for i in range(nr_line)
    )
    # xlated instruction -> "file:line  source text", from bpftool's dump
    xlated = subprocess.check_output(["bpftool", "prog", "dump", "xlated", "id", str(prog_id), "linum"], text=True)
    source, cur = {}, None
    for line in xlated.splitlines():
        m = re.match(r"; (.*) \[file:(\S+) line_num:(\d+)", line)
        if m:
            cur = f"{m.group(2).split('/')[-1]}:{m.group(3)}  {m.group(1).strip()[:70]}"
            continue
        m = re.match(r"\s*(\d+):", line)
        if m:
            source[int(m.group(1))] = cur
    offsets = [r[0] for r in recs]
    counts, total = collections.Counter(), 0
    pattern = re.compile(r"bpf_prog_[0-9a-f]+_" + re.escape(name) + r"\+0x([0-9a-f]+)")
    for line in open(samples):
        m = pattern.search(line)
        if not m:
            continue
        i = bisect.bisect_right(offsets, int(m.group(1), 16)) - 1
        if i >= 0:
            counts[source.get(recs[i][1], "?")] += 1
            total += 1
    for k, v in counts.most_common(top):
        print(f"{100 * v / total:6.2f}%  {k}")
    print(f"samples in {name}: {total}")


if __name__ == "__main__":
    main()
