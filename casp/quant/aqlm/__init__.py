"""AQLM (Egiazarian et al., ICML 2024): quantize.py (additive quantization: k-means init,
Adam on codebooks and scales, beam search over codes), linear.py (the aqlm package's
layout and kernels), layer_pass.py (the engine pass and ``casp aqlm``'s flags), setting.py
(MxB codebooks, what they store), export.py (the HF AQLM format)."""
