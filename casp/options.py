"""Parsers of the values users give casp (command-line flags, plan entries): each returns
the value or raises a CaspError that names the problem and the fix. The command line
(casp.cli.args) and the quantizers' flag tables (casp.quant.*.layer_pass) use them."""
from __future__ import annotations

from casp.errors import CaspError


def ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise CaspError(f"compression ratio {text!r} is not a number; give a value in (0, 1), "
                        "e.g. 0.75")
    if not 0.0 < value < 1.0:
        raise CaspError(f"compression ratio {value} is outside (0, 1); give e.g. 0.75 to remove "
                        "75% of W_q/W_k parameters")
    return value


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"{text!r} is not a whole number")
    if value < 1:
        raise CaspError(f"{value} must be at least 1")
    return value


def layer_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            if "-" in part:
                a, b = part.split("-")
                out += range(int(a), int(b) + 1)
            else:
                out.append(int(part))
    except ValueError:
        raise CaspError(f"--layers {text!r} is not a list such as 0,1,5-7")
    return out


def bits_list(text: str, option: str = "--bits") -> list[int]:
    try:
        bits = sorted({int(b) for b in text.split(",") if b.strip()})
    except ValueError:
        raise CaspError(f"{option} {text!r} is not a list of widths such as 2,3,4")
    bad = [b for b in bits if not 2 <= b <= 8]
    if bad or not bits:
        raise CaspError(f"{option}: bit width {bad[0] if bad else text!r} is outside 2-8; "
                        "give e.g. 2,3,4")
    return bits


def width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"bit width {text!r} is not a whole number; use 2 to 8")
    if not 2 <= value <= 8:
        raise CaspError(f"bit width {value} is outside 2-8; casp quantizes to 2 to 8 bits")
    return value


def group(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"group size {text!r} is not a whole number; use e.g. 128, or -1 for "
                        "one group per output channel")
    if value == 0 or value < -1:
        raise CaspError(f"group size {value} is invalid; use a positive size such as 128, or -1 "
                        "for one group per output channel")
    return value


def non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise CaspError(f"{text!r} is not a whole number")
    if value < 0:
        raise CaspError(f"{value} must be 0 or more")
    return value
