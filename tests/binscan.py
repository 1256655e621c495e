"""A static scan of shipped x86-64 machine code: which functions use which instruction-set extensions.

Why a static scan: a binary built with ``-march=native`` on an AVX-512 host passes every test on
that host and dies with SIGILL on the first CPU without AVX-512; only reading the machine code
finds it on any machine. Every instruction of every executable section is decoded (iced-x86), its
CPUID features are read, and it is attributed to the ELF function symbol that contains it.

Code that uses an extension is portable only when the program chooses it at run time (pgvector's
``*Avx512Popcount`` functions, PostgreSQL's ``pg_popcount_avx512``, GCC ``target_clones`` variants
such as ``foo.avx2``): :data:`DISPATCHED` recognises such functions by name.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from pathlib import Path

from elftools.elf.constants import SH_FLAGS
from elftools.elf.elffile import ELFFile
from iced_x86 import CpuidFeature, Decoder

_FEATURE_NAMES = {v: k for k, v in vars(CpuidFeature).items() if k.isupper()}
AVX512 = {v for k, v in vars(CpuidFeature).items() if k.startswith("AVX512")}
# Run-time dispatched variants: named for the extension they need (pgvector, PostgreSQL) or GCC's
# target_clones / ifunc suffixes.
DISPATCHED = re.compile(r"avx512|\.(avx|avx2|avx512\w*|fma|arch_x86_64_v\d)(\.|$)", re.IGNORECASE)


@dataclass
class ScanResult:
    path: Path
    instructions: int = 0
    # function name -> set of AVX-512 feature names it uses
    avx512_by_function: dict[str, set[str]] = field(default_factory=dict)

    def undispatched_avx512(self) -> dict[str, set[str]]:
        """Functions that use AVX-512 although nothing selects them at run time."""
        return {f: s for f, s in self.avx512_by_function.items() if not DISPATCHED.search(f)}


def _function_ranges(elf: ELFFile) -> tuple[list[int], list[tuple[int, int, str]]]:
    funcs: dict[int, tuple[int, int, str]] = {}
    for name in (".symtab", ".dynsym"):
        sec = elf.get_section_by_name(name)
        if sec is None:
            continue
        for sym in sec.iter_symbols():
            if sym["st_info"]["type"] not in ("STT_FUNC", "STT_GNU_IFUNC") or not sym["st_value"]:
                continue
            start, size = sym["st_value"], max(sym["st_size"], 1)
            if start not in funcs or funcs[start][1] < start + size:
                funcs[start] = (start, start + size, sym.name)
    ranges = sorted(funcs.values())
    return [r[0] for r in ranges], ranges


def features_outside_dispatch(path: Path) -> dict[str, set[str]]:
    """CPUID feature name -> functions (not named for run-time dispatch) whose instructions need it."""
    used: dict[str, set[str]] = {}
    with open(path, "rb") as f:
        elf = ELFFile(f)
        starts, ranges = _function_ranges(elf)
        for sec in elf.iter_sections():
            if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or sec["sh_type"] == "SHT_NOBITS":
                continue
            for ins in Decoder(64, sec.data(), ip=sec["sh_addr"]):
                i = bisect.bisect_right(starts, ins.ip) - 1
                fn = ranges[i][2] if i >= 0 and ranges[i][0] <= ins.ip < ranges[i][1] else "?"
                if DISPATCHED.search(fn):
                    continue
                for feat in ins.cpuid_features():
                    used.setdefault(_FEATURE_NAMES[feat], set()).add(fn)
    return used


def scan_elf(path: Path) -> ScanResult:
    """Decode every executable section of ``path`` and attribute AVX-512 instructions to functions."""
    res = ScanResult(Path(path))
    with open(path, "rb") as f:
        elf = ELFFile(f)
        if elf["e_machine"] != "EM_X86_64":
            raise ValueError(f"{path}: not an x86-64 ELF file ({elf['e_machine']})")
        starts, ranges = _function_ranges(elf)
        for sec in elf.iter_sections():
            if not sec["sh_flags"] & SH_FLAGS.SHF_EXECINSTR or sec["sh_type"] == "SHT_NOBITS":
                continue
            decoder = Decoder(64, sec.data(), ip=sec["sh_addr"])
            for instr in decoder:
                res.instructions += 1
                feats = instr.cpuid_features()
                hit = [x for x in feats if x in AVX512]
                if not hit:
                    continue
                i = bisect.bisect_right(starts, instr.ip) - 1
                if i >= 0 and ranges[i][0] <= instr.ip < ranges[i][1]:
                    fn = ranges[i][2]
                else:
                    fn = f"<no symbol at {instr.ip:#x} in {sec.name}>"
                res.avx512_by_function.setdefault(fn, set()).update(_FEATURE_NAMES[x] for x in hit)
    return res
