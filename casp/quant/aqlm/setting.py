"""AQLM's setting as a plan sees it: M codebooks of 2^B codewords over groups of
``in_group_size`` inputs (``MxB`` or ``MxBgG``), its checks, and what it stores (codes in
int8/int16 containers, fp16 codebooks, one fp16 scale per output row)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from casp.errors import CaspError

MAX_CODEBOOK_BITS = 16          # the aqlm kernels index codes as int8 / int16
MAX_CODEBOOKS = 8
SETTING_PATTERN = re.compile(r"^(\d+)x(\d+)(?:g(\d+))?$")


def container_bits(nbits: int) -> int:
    """Bits one code occupies in the aqlm layout (int8 or int16)."""
    return 8 if nbits <= 8 else 16


@dataclass(frozen=True)
class AQLMSetting:
    """M codebooks of 2^B codewords over groups of ``in_group_size`` input weights."""
    num_codebooks: int
    nbits: int
    in_group_size: int = 8

    quantizer = "aqlm"          # which pass runs it (not a field)

    def __post_init__(self):
        if not 1 <= self.num_codebooks <= MAX_CODEBOOKS:
            raise CaspError(f"AQLM setting {self.name}: 1 to {MAX_CODEBOOKS} codebooks are "
                            "supported; use e.g. 2x8 or 1x16")
        if not 1 <= self.nbits <= MAX_CODEBOOK_BITS:
            raise CaspError(f"AQLM setting {self.name}: codebooks of 2^{self.nbits} entries "
                            f"cannot run on the aqlm kernels (codes are int8/int16, at most "
                            f"{MAX_CODEBOOK_BITS} bits); use e.g. 2x8, 2x12 or 1x16")
        if self.in_group_size < 1:
            raise CaspError(f"AQLM group size {self.in_group_size} must be positive; the usual "
                            "value is 8")

    @classmethod
    def parse(cls, text: str, in_group_size: int = 8) -> "AQLMSetting":
        """'2x8' (M x B, group ``in_group_size``) or '2x8g8'."""
        match = SETTING_PATTERN.match(str(text).strip())
        if not match:
            raise CaspError(f"AQLM setting {text!r} is not MxB (e.g. 2x8, 1x16, 2x12) or MxBgG "
                            "(e.g. 2x8g8)")
        m, b, g = match.groups()
        return cls(int(m), int(b), int(g) if g else in_group_size)

    @property
    def name(self) -> str:
        return f"{self.num_codebooks}x{self.nbits}" + (
            f"g{self.in_group_size}" if self.in_group_size != 8 else "")

    @property
    def codebook_size(self) -> int:
        return 2 ** self.nbits

    @property
    def nominal_bits(self) -> float:
        """Code bits per weight, M * B / ig (what the AQLM paper calls the setting)."""
        return self.num_codebooks * self.nbits / self.in_group_size

    def check(self, out_features: int, in_features: int, name: str = "the module") -> None:
        if in_features % self.in_group_size:
            raise CaspError(f"AQLM group size {self.in_group_size} does not divide {name}'s "
                            f"{in_features} inputs; choose a group size that divides every "
                            "input dimension (for low-rank factors, rerun casp lowrank with "
                            f"--rank-multiple {self.in_group_size})")

    def cost(self, out_features: int, in_features: int) -> int:
        """Stored bits: codes in their int8/int16 containers, fp16 codebooks, one fp16 scale
        per output row."""
        groups = out_features * (in_features // self.in_group_size)
        codes = groups * self.num_codebooks * container_bits(self.nbits)
        codebooks = self.num_codebooks * self.codebook_size * self.in_group_size * 16
        return codes + codebooks + out_features * 16

    def plan_entry(self) -> dict:
        """What a plan records of the setting (the width it stands for is the plan's)."""
        return {"group_size": self.in_group_size,
                "codebooks": f"{self.num_codebooks}x{self.nbits}"}

    @classmethod
    def from_plan_entry(cls, entry: dict) -> "AQLMSetting":
        return cls.parse(entry["codebooks"], int(entry.get("group_size", 8)))


def described_bits(d: dict) -> int:
    """Stored bits of an AQLM module from its checkpoint description."""
    setting = AQLMSetting(d["num_codebooks"], d["nbits_per_codebook"], d["in_group_size"])
    return setting.cost(d["out_features"], d["in_features"])
