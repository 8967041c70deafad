"""Compile every Triton kernel variant of the project ahead of time for real GPUs, on any machine
(no GPU needed: Triton ships its own ptxas). The CPU interpreter runs the kernels' arithmetic but not
their compilation, so type, layout and register errors would otherwise first show on a GPU.

    python -m worldmodels.ops.aot [--arch 80,90] [--quick] [--candidates]

Prints one line per target and exits 1 naming the first variant that fails. `--quick` compiles the
smallest and largest time tile only; `--candidates` compiles the kernels that only a
`KernelConfig` override launches (the sweep's candidates) instead. Run it without TRITON_INTERPRET (under the interpreter
`triton.jit` gives functions that cannot be compiled).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def variants(quick: bool = False, candidates: bool = False):
    from worldmodels.ops import scan

    if candidates:
        yield from scan.candidate_variants()
        return
    for name, kernel, sig, const, options in scan.kernel_variants():
        if not quick or const["BLOCK_T"] in (1, scan.MAX_BLOCK_T, scan.FEW_ROWS_CONFIG.block_t):
            yield name, kernel, sig, const, options


def compile_all(archs: list[int], quick: bool = False, candidates: bool = False) -> list[tuple[int, str, int]]:
    """Compile every variant for each compute capability (e.g. 80, 90); returns (arch, variant, cubin
    bytes) per compile, and raises RuntimeError naming the first variant that does not compile."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    done = []
    for arch in archs:
        for name, kernel, sig, const, options in variants(quick, candidates):
            try:
                k = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=const), target=GPUTarget("cuda", arch, 32),
                                   options=options)
            except Exception as e:  # noqa: BLE001 - whatever the compiler raises, name the variant
                raise RuntimeError(f"sm_{arch} {name}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
            done.append((arch, name, len(k.asm["cubin"])))
    return done


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="80,90", help="compute capabilities, comma-separated")
    p.add_argument("--quick", action="store_true", help="the smallest and largest time tile only")
    p.add_argument("--candidates", action="store_true", help="the kernels no default launches (sweep candidates)")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("aot: unset TRITON_INTERPRET (the interpreter's kernels cannot be compiled)", file=sys.stderr)
        return 2
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton's current default, stated
    archs = [int(x) for x in a.arch.split(",")]
    tic = time.time()
    try:
        done = compile_all(archs, a.quick, a.candidates)
    except RuntimeError as e:
        print(f"aot: {e}", file=sys.stderr)
        return 1
    for arch in archs:
        sizes = [n for ar, _, n in done if ar == arch]
        print(f"sm_{arch}: {len(sizes)} kernel variants compiled, cubin {min(sizes)}-{max(sizes)} bytes")
    print(f"{len(done)} compiles in {time.time() - tic:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
