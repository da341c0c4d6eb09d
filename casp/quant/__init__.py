"""Stage 3: the quantizers (GPTQ now; AQLM and QuIP# share the same pass structure)."""
