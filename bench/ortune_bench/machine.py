"""The machine: CPU family and microarchitecture, memory copy bandwidth, and the cores other processes
use (a shared machine: timed runs are retried while it is busy)."""

from __future__ import annotations

import os
import platform
import re
import statistics
import threading
import time
from pathlib import Path

# A run during which other processes used more than this many cores is retried (a shared machine):
# spinning thread pools (onnxruntime's and PyTorch's) slow down several-fold when a core is taken.
CONTENDED_CORES = 0.25
MAX_TRIES = 3

# AMD: (family, first model, last model, microarchitecture), from AMD's processor programming references.
AMD_CORES = [
    (0x17, 0x00, 0x2F, "Zen"),
    (0x17, 0x30, 0xFF, "Zen 2"),
    (0x19, 0x00, 0x0F, "Zen 3"),
    (0x19, 0x20, 0x2F, "Zen 3"),
    (0x19, 0x40, 0x5F, "Zen 3"),
    (0x19, 0x10, 0x1F, "Zen 4"),
    (0x19, 0x60, 0x7F, "Zen 4"),
    (0x19, 0xA0, 0xAF, "Zen 4"),
    (0x1A, 0x00, 0x4F, "Zen 5"),
    (0x1A, 0x60, 0x7F, "Zen 5"),
]
# Intel family 6 server (and common client) models.
INTEL_CORES = {
    0x3F: "Haswell",
    0x4F: "Broadwell",
    0x55: "Skylake-SP",
    0x6A: "Ice Lake-SP",
    0x6C: "Ice Lake-SP",
    0x8F: "Sapphire Rapids",
    0xCF: "Emerald Rapids",
    0xAD: "Granite Rapids",
    0xAE: "Granite Rapids",
    0xAF: "Sierra Forest",
    0x8C: "Tiger Lake",
    0x97: "Alder Lake",
    0x9A: "Alder Lake",
    0xB7: "Raptor Lake",
    0xBA: "Raptor Lake",
    0xBF: "Raptor Lake",
    0xAA: "Meteor Lake",
}
# /proc/cpuinfo flag -> the name the report uses: what selects MLAS's int4/int8 kernels.
ISA_FLAGS = (
    ("avx2", "AVX2"),
    ("avx_vnni", "AVX-VNNI"),
    ("avx512f", "AVX-512"),
    ("avx512_vnni", "AVX-512 VNNI"),
    ("avx512_bf16", "AVX-512 BF16"),
    ("amx_int8", "AMX-INT8"),
    ("amx_bf16", "AMX-BF16"),
)


def cpu_family(vendor_id: str, family: int, model: int, stepping: int = 0, flags=()) -> dict:
    """Vendor, family/model and microarchitecture name ("AMD Zen 3", "Intel Sapphire Rapids"; else
    "<vendor> family F model M"), and the ISA extensions that pick onnxruntime's kernels.
    `name` is the key under which results.json keeps this family's results."""
    vendor = {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(vendor_id, vendor_id or "unknown")
    arch = None
    if vendor == "AMD":
        arch = next((name for f, first, last, name in AMD_CORES if f == family and first <= model <= last), None)
    elif vendor == "Intel" and family == 6:
        arch = INTEL_CORES.get(model)
        if model == 0x55:  # one model number, three generations told apart by stepping
            arch = "Cascade Lake" if 5 <= stepping <= 7 else "Cooper Lake" if stepping >= 10 else arch
    flags = set(flags)
    return {
        "name": f"{vendor} {arch}" if arch else f"{vendor} family {family} model {model}",
        "vendor": vendor,
        "family": family,
        "model": model,
        "stepping": stepping,
        "microarchitecture": arch,
        "isa": [name for flag, name in ISA_FLAGS if flag in flags],
    }


def this_cpu_family(cpuinfo: str | None = None) -> dict:
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields = {
        k.strip(): v.strip()
        for k, v in (line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    }

    def number(key: str) -> int:
        return int(fields[key]) if fields.get(key, "").isdigit() else -1

    family = cpu_family(
        fields.get("vendor_id", platform.machine()),
        number("cpu family"),
        number("model"),
        max(number("stepping"), 0),
        fields.get("flags", "").split(),
    )
    family["model_name"] = fields.get("model name", platform.processor() or platform.machine())
    return family


def machine_info() -> dict:
    family = this_cpu_family()
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))
    except (OSError, AttributeError):
        mem_kb = 0
    import numpy
    import onnxruntime
    import onnxruntime_genai
    import torch

    return {
        "cpu": family["model_name"],
        "cpu_family": family,
        "cpu_detail": f"family {family['family']} model {family['model']}: {', '.join(family['isa'])}",
        "l3_cache": l3_cache(),
        "cores": os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "gpu": "none used (CPU only; no GPU lent to this run)",
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": onnxruntime_genai.__version__,
            "numpy": numpy.__version__,
        },
        "load_average_at_start": list(os.getloadavg()),
        # huge pages change how fast a core streams the int4 weights (8-10 % on the Intel Xeon: bench/NOTES.md)
        "transparent_hugepage": transparent_hugepage(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES") or None,
    }


def transparent_hugepage(path: Path = Path("/sys/kernel/mm/transparent_hugepage/enabled")) -> str | None:
    """The kernel's transparent huge page mode ("always", "madvise", "never"): the bracketed word."""
    try:
        found = re.search(r"\[(\w+)\]", path.read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def l3_cache() -> str | None:
    """The last-level cache as the kernel reports it ("32768K"): whether the weights fit changes the floor."""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                return (index / "size").read_text().strip()
        except OSError:
            pass
    return None


def copy_bandwidth(megabytes: int = 512, repeats: int = 9, threads: int | None = None) -> float:
    """Median copy bandwidth in bytes/s, counting bytes read + bytes written (STREAM's convention),
    of a large numpy copy split over `threads` threads (numpy releases the GIL while copying)."""
    import numpy as np

    threads = threads or os.cpu_count() or 1
    size = megabytes * 2**20
    source = np.ones(size, dtype=np.uint8)
    target = np.zeros_like(source)
    bounds = [size * i // threads for i in range(threads + 1)]
    pairs = [(target[a:b], source[a:b]) for a, b in zip(bounds, bounds[1:])]
    seconds = []
    for _ in range(repeats):
        workers = [threading.Thread(target=np.copyto, args=pair) for pair in pairs]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        seconds.append(time.perf_counter() - started)
    return 2 * size / statistics.median(seconds)


def quiet_copy_bandwidth(wait_s: float = 30.0) -> tuple[float, float]:
    """copy_bandwidth() retried (up to MAX_TRIES) while other processes use more than CONTENDED_CORES:
    two copying threads lose a third of their bandwidth when a core is taken. -> (bytes/s, others' cores)"""
    best = (0.0, float("inf"))
    for _ in range(MAX_TRIES):
        before = cpu_snapshot()
        bandwidth = copy_bandwidth()
        busy = other_cores(before, cpu_snapshot())
        best = min(best, (bandwidth, busy), key=lambda sample: sample[1])
        if busy <= CONTENDED_CORES or not wait_for_quiet(time.perf_counter() + wait_s):
            break
    return best


def cpu_snapshot() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process and its finished children,
    wall clock), on Linux."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    except (OSError, ValueError):
        fields = [0] * 8
    hertz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
    own = os.times()  # children's times count once they have been waited for (make all and its stages)
    return busy / hertz, own.user + own.system + own.children_user + own.children_system, time.perf_counter()


def other_cores(before: tuple, after: tuple) -> float:
    """Cores used by other processes between two snapshots."""
    elapsed = after[2] - before[2]
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / elapsed if elapsed > 0 else 0.0


def wait_for_quiet(deadline: float, probe_s: float = 2.0) -> bool:
    """Sleep until other processes use at most CONTENDED_CORES over `probe_s`, or until `deadline`."""
    while time.perf_counter() < deadline:
        before = cpu_snapshot()
        time.sleep(probe_s)
        if other_cores(before, cpu_snapshot()) <= CONTENDED_CORES:
            return True
    return False
