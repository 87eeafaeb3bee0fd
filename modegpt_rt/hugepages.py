"""CPU tensors on transparent huge pages.

Decoding one token streams every weight matrix from DRAM once. With 4 KB pages that stream crosses a
page, and needs a TLB entry, every 4 KB; on 2 MB pages SmolLM2 decoded 2-7% faster on this project's CI
machine kind, side by side in one process (`python -m modegpt_rt.bench.interleaved PATH --huge-pages off,on`,
bench/results/hugepages_ab*.json). Linux grants huge pages to a mapping that asks for them
(`madvise(MADV_HUGEPAGE)`, honoured when /sys/kernel/mm/transparent_hugepage/enabled is `always` or
`madvise`); elsewhere nothing changes.
"""

from __future__ import annotations

import mmap
import re
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
ALIGN = 64  # every tensor starts on a cache line (the C++ kernels' vector loads)
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def supported() -> bool:
    """Whether this system can grant a mapping huge pages on request."""
    if not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = re.search(r"\[(\w+)\]", _THP_SETTING.read_text())
    except OSError:
        return False
    return setting is not None and setting.group(1) in ("always", "madvise")


def arena(nbytes: int) -> torch.Tensor:
    """A zero-filled uint8 CPU tensor of `nbytes` starting on a 2 MB boundary of an anonymous mapping that
    asked for huge pages. The tensor (and every view of it) keeps the mapping alive."""
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then map 2 MB pages
    whole = torch.frombuffer(m, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    return whole[start : start + nbytes]


def place(tensors, replace) -> int:
    """Move contiguous CPU `tensors` (any dtypes) into one huge-page arena, one after another, each on a
    64-byte boundary: `replace(i, view)` gets the copy of tensors[i] (same values, shape and dtype) as soon as
    it is made, so the caller can drop the original and the peak stays near one copy of the whole. Returns the
    arena's size in bytes."""
    offsets, end = [], 0
    for t in tensors:
        offsets.append(end)
        end += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
    buf = arena(max(end, ALIGN))
    for i, off in enumerate(offsets):
        t = tensors[i]
        view = buf[off : off + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        tensors[i] = t = None  # the caller's replacement may be the last reference to the original
        replace(i, view)
    return end


def huge_bytes(t: torch.Tensor) -> int:
    """Bytes of huge pages backing the mapping that holds `t` (from /proc/self/smaps; 0 if none or unknown)."""
    addr = t.data_ptr()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside = False
    for line in lines:
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            inside = int(head.group(1), 16) <= addr < int(head.group(2), 16)
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1]) * 1024
    return 0
