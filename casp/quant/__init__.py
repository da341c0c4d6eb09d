"""Stage 3: the quantizers, each a folder, all reached through ``registry.QUANTIZERS``.

    gptq/  aqlm/  quip/   each: quantize.py (the algorithm, beside its paper), linear.py (the
                          stored module), layer_pass.py (the engine pass, its flags),
                          setting.py (a module's setting: cost, checks, plan entry), and
                          export.py where a standard format exists; quip/ also codebooks.py
                          (E8 lattice codebooks), hadamard.py (fast transforms), hessians.py
    registry.py           one QuantizerSpec per quantizer
    layer_groups.py       which linears of a layer a pass quantizes, in which order
    stored.py             the base of the stored modules
    packing.py            bit packing
    finetune.py           block fine-tuning of a finished layer (AQLM, QuIP#)
    export.py             what the standard-format exports share
"""
