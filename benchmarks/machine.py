"""What every benchmark prints first: the CPU model and the flags that change its numbers, torch's
thread count, and the GPU when there is one. Results from different machines are not comparable
without it (an AVX-512/AMX Xeon and an AVX2-only EPYC differ in speed and in floating-point results).

    from machine import describe_machine   # benchmarks/ is on sys.path when a script in it runs
    print(describe_machine())
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch

# the instruction-set extensions that decide which matmul kernels torch (oneDNN) picks on x86
RELEVANT_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")


def cpu_model_and_flags(cpuinfo: str | None = None) -> tuple[str, list[str]]:
    """The CPU's model name and which of ``RELEVANT_FLAGS`` it has (from ``/proc/cpuinfo`` on Linux)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    have = set(flags.group(1).split()) if flags else set()
    return (model.group(1).strip() if model else platform.processor() or platform.machine()), [
        f for f in RELEVANT_FLAGS if f in have
    ]


def describe_machine() -> str:
    """One line: CPU model, relevant flags, cores, torch threads and version, and the GPU if any."""
    model, flags = cpu_model_and_flags()
    line = (
        f"CPU: {model} ({', '.join(flags) or 'no AVX2/AVX-512/AMX flags'}); {os.cpu_count()} cores, "
        f"torch {torch.__version__} with {torch.get_num_threads()} threads"
    )
    if torch.cuda.is_available():
        line += f"; GPU: {torch.cuda.get_device_name()}"
    return line
