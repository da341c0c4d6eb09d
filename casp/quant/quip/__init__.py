"""QuIP# (Tseng et al., ICML 2024): hadamard.py (random-sign Hadamard incoherence),
codebooks.py (E8P12 and E81B lattice codebooks), quantize.py (BlockLDLQ), linear.py (runs
from the packed codes), layer_pass.py (the engine pass and ``casp quip``'s flags),
setting.py (a codebook, what it stores), hessians.py (the offline Hessians)."""
