"""GPTQ (Frantar et al., ICLR 2023): quantize.py (the algorithm), linear.py (packed module),
layer_pass.py (the engine pass and ``casp gptq``'s flags), setting.py (bits and group size,
what they store), export.py (the standard GPTQ format transformers and vLLM load)."""
