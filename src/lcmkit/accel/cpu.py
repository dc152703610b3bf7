"""Which precision the fast mode runs at on this CPU, decided from the CPU's feature flags.

The rule is data (`PRECISION_RULES`), checked in order; the first whose flags the CPU has wins:
- "bf16": bfloat16 arithmetic (OpenVINO's inference precision), where the CPU has bf16 dot products
  (`avx512_bf16`, or AMX tiles `amx_bf16`). Without them OpenVINO would emulate bf16, slower than fp32.
- "int8-weights": int8-compressed weights, float activations, where the CPU has int8 dot products (`avx512_vnni`,
  `avx_vnni`, `amx_int8`). Without VNNI the unpacking costs more than the smaller weights save (an AVX2-only
  CPU measured int8 slower than fp32 in OpenVINO's own reports).
- otherwise "fp32": what pays on an AVX2 CPU, and the eager image up to rounding.

The flags come from `/proc/cpuinfo` (Linux); elsewhere none are found and the choice is fp32. Nothing here imports
openvino or torch, so `lcmkit --fast` can say what it will do before loading anything.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

FAST_PRECISIONS = ("auto", "fp32", "bf16", "int8-weights", "int8")
"""What `enable_fast(precision=...)` and `--fast-precision` take; "auto" applies `PRECISION_RULES`, then, on a CPU
with int8 dot products (`INT8_DOT_FLAGS`), tries int8 for the UNet and the VAE decoder and keeps it only where
it measured faster here and the image held (`lcmkit.accel.int8`).

"int8" forces that: the UNet and the VAE decoder in int8 (weights and activations, calibrated on the pipeline's
own inputs for the compiled size), the text encoder and other sizes as in "bf16", nothing measured. On the
shipped tiny model an int8 UNet's image falls to 18 dB PSNR against exact mode, which is why "auto" checks."""

INT8_DOT_FLAGS = (frozenset({"avx512_vnni"}), frozenset({"avx_vnni"}), frozenset({"amx_int8"}))
"""CPUs with any of these have int8 dot products: where "auto" tries int8 graphs."""


@dataclass(frozen=True)
class PrecisionRule:
    """Run at `precision` when the CPU has every flag of any one set in `any_of`."""

    precision: str
    any_of: tuple[frozenset[str], ...]
    why: str


PRECISION_RULES = (
    PrecisionRule(
        "bf16",
        (frozenset({"avx512_bf16"}), frozenset({"amx_bf16"})),
        "the CPU has bf16 dot products",
    ),
    PrecisionRule("int8-weights", INT8_DOT_FLAGS, "the CPU has int8 (VNNI) dot products"),
)
FALLBACK = PrecisionRule("fp32", (frozenset(),), "no bf16 or VNNI units: int8 and bf16 would be emulated")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> frozenset[str]:
    """The feature flags of the first CPU listed in `cpuinfo` (Linux's format); empty when there is no such file."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86, arm
            return frozenset(value.split())
    return frozenset()


def choose_precision(flags: Iterable[str] | None = None) -> PrecisionRule:
    """The first rule of `PRECISION_RULES` that `flags` (default: this CPU's) satisfy, else `FALLBACK` (fp32)."""
    return next((rule for rule in PRECISION_RULES if _has_any(flags, rule.any_of)), FALLBACK)


def has_int8_dot(flags: Iterable[str] | None = None) -> bool:
    """Whether `flags` (default: this CPU's) include int8 dot products (`INT8_DOT_FLAGS`)."""
    return _has_any(flags, INT8_DOT_FLAGS)


def _has_any(flags: Iterable[str] | None, any_of: tuple[frozenset[str], ...]) -> bool:
    have = frozenset(cpu_flags() if flags is None else flags)
    return any(needed <= have for needed in any_of)


def resolve_precision(precision: str, flags: Iterable[str] | None = None) -> PrecisionRule:
    """`precision` as a rule: "auto" chooses from the CPU's flags; an explicit one is taken as asked."""
    if precision not in FAST_PRECISIONS:
        raise ValueError(f"unknown fast-mode precision {precision!r}; allowed: {', '.join(FAST_PRECISIONS)}")
    if precision == "auto":
        return choose_precision(flags)
    return PrecisionRule(precision, (frozenset(),), "asked for")
