"""Compile every verification kernel for a CUDA architecture, without a GPU.

The CPU interpreter (TRITON_INTERPRET=1) runs the kernels' Python, not Triton's compiler, so
type errors, unsupported ops or constexpr mistakes that only the real compiler sees would slip
through CPU-only tests. This runs the full pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin, with
the ptxas that ships in the triton wheel) for each kernel at the dtypes the engine uses.

    TRITON_INTERPRET=0 python -m specdec.kernels.compile_check [--arch 90] [--dtype bf16]

Prints one line per kernel and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys

from .rng import HAS_TRITON


def signatures(dtype: str) -> dict[str, tuple[object, dict[str, str], dict[str, object]]]:
    """kernel name -> (jit function, argument types, constexpr values)."""
    from . import common, greedy, sample, stats

    ptr = f"*{dtype}"
    splits = {"S": "i32", "CHUNK": "i32"}
    return {
        "greedy_argmax": (
            greedy.greedy_argmax_kernel,
            {"logits_ptr": ptr, "part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "V": "i32",
             **splits, "BLOCK_V": "constexpr"},
            {"BLOCK_V": greedy.DEFAULT_BLOCK_V},
        ),
        "commit": (
            common.commit_kernel,
            {"part_val_ptr": "*fp32", "part_idx_ptr": "*i32", "fb_val_ptr": "*fp32",
             "fb_idx_ptr": "*i32", "accept_ptr": "*i32", "draft_ptr": "*i64",
             "tokens_ptr": "*i64", "num_acc_ptr": "*i64", "K": "i32", "S": "i32",
             "SAMPLE": "constexpr", "BLOCK_K": "constexpr", "BLOCK_S": "constexpr"},
            {"SAMPLE": True, "BLOCK_K": 16, "BLOCK_S": 8},
        ),
        "sample_stats": (
            sample.sample_stats_kernel,
            {"target_ptr": ptr, "draft_ptr": ptr, "inv_t_ptr": "*fp32", "part_ptr": "*fp32",
             "K": "i32", "V": "i32", **splits, "BLOCK_V": "constexpr"},
            {"BLOCK_V": sample.DEFAULT_BLOCK_V},
        ),
        "sample_race": (
            sample.sample_race_kernel,
            {"target_ptr": ptr, "draft_ptr": ptr, "draft_tok_ptr": "*i64", "inv_t_ptr": "*fp32",
             "seed_ptr": "*i64", "offset_ptr": "*i64", "part_ptr": "*fp32", "val_ptr": "*fp32",
             "idx_ptr": "*i32", "fb_val_ptr": "*fp32", "fb_idx_ptr": "*i32",
             "accept_ptr": "*i32", "K": "i32", "V": "i32", **splits,
             "BLOCK_V": "constexpr", "BLOCK_S": "constexpr"},
            {"BLOCK_V": sample.DEFAULT_BLOCK_V, "BLOCK_S": 8},
        ),
        "acceptance_stats": (
            stats.acceptance_stats_kernel,
            {"target_ptr": ptr, "draft_ptr": ptr, "alpha_ptr": "*fp32", "kl_ptr": "*fp32",
             "V": "i32", "inv_t": "fp32", "BLOCK_V": "constexpr"},
            {"BLOCK_V": stats.DEFAULT_BLOCK_V},
        ),
    }


def compile_all(arch: int = 90, dtype: str = "bf16") -> dict[str, str]:
    """kernel name -> "ok" or the compiler's error (first lines)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    results = {}
    for name, (fn, sig, constexprs) in signatures(dtype).items():
        src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
        try:
            kernel = triton.compile(
                src, target=target, options={"num_warps": 4, "enable_fp_fusion": False}
            )
            results[name] = "ok" if kernel.asm.get("cubin") else "no cubin"
        except Exception as e:  # noqa: BLE001 - any compiler failure is reported, not raised
            results[name] = f"{type(e).__name__}: {str(e)[:2000]}"
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 80, 90")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    args = parser.parse_args(argv)
    if not HAS_TRITON:
        print("error: triton is not installed", file=sys.stderr)
        return 2
    from .common import interpreting

    if interpreting():
        print("error: unset TRITON_INTERPRET (or set it to 0): the interpreter does not compile",
              file=sys.stderr)
        return 2
    results = compile_all(args.arch, args.dtype)
    for name, status in results.items():
        print(f"{name:18s} sm_{args.arch} {args.dtype}: {status}")
    return 0 if all(s == "ok" for s in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
