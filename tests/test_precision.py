"""bf16 only where the hardware does it natively: flag detection and the presets' fallback."""

from specdec.pipeline import PRESETS, for_this_machine
from specdec.precision import bf16_is_fast, bf16_warning, cpu_flags, cpu_native_bf16

# Trimmed /proc/cpuinfo of two x86 machines this project ran on, and of an arm64 core.
AVX2_ONLY = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2
processor\t: 1
flags\t\t: fpu vme sse sse2 avx f16c fma avx2 bmi2
"""
ZEN4 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n"
AVX512_NO_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512bw avx512_vnni\n"
ARM64 = "processor\t: 0\nFeatures\t: fp asimd aes sha2 bf16 i8mm\n"


def test_flags_come_from_the_first_flags_line():
    assert cpu_flags(AVX2_ONLY) == {"fpu", "vme", "sse", "sse2", "avx", "f16c", "fma", "avx2",
                                    "bmi2"}
    assert cpu_flags("no flags here\n") == set()


def test_native_bf16_needs_the_bf16_extension_not_just_avx512():
    assert not cpu_native_bf16(AVX2_ONLY)
    assert not cpu_native_bf16(AVX512_NO_BF16)
    assert cpu_native_bf16(ZEN4)
    assert cpu_native_bf16(ARM64)
    assert bf16_is_fast("cuda:0", AVX2_ONLY)


def test_the_warning_names_the_fix_only_where_bf16_is_emulated():
    msg = bf16_warning("cpu", "--dtype bfloat16", "pass --dtype float32", cpuinfo=AVX2_ONLY)
    assert "--dtype bfloat16" in msg and "pass --dtype float32" in msg
    assert bf16_warning("cpu", cpuinfo=ZEN4) is None
    assert bf16_warning("cuda", cpuinfo=AVX2_ONLY) is None


def test_presets_fall_back_to_fp32_without_native_bf16():
    speed = PRESETS["speed"]
    assert speed.vllm_dtype == "bfloat16" and speed.finetune["bf16"]
    slow = for_this_machine(speed, bf16_fast=False)
    assert slow.vllm_dtype == "float32" and slow.finetune["bf16"] is False
    # everything else in the recipe is untouched
    assert {k: v for k, v in slow.finetune.items() if k != "bf16"} == \
        {k: v for k, v in speed.finetune.items() if k != "bf16"}
    assert for_this_machine(speed, bf16_fast=True) is speed
    quick = PRESETS["quick"]  # fp32 healing already: only the vLLM dtype changes
    assert "bf16" not in quick.finetune
    assert for_this_machine(quick, bf16_fast=False).finetune == quick.finetune
