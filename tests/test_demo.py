"""`casp demo` end to end (QuIP# rows; with --gptq, GPTQ rows; with --aqlm, AQLM rows) on a
small random Llama wide enough for 2x8 codebooks, standing in for the embedded SmolLM2."""
import re

import transformers

import casp.cli
import casp.cli.demo
import casp.quant.aqlm.layer_pass
from casp.quant.aqlm.layer_pass import AQLMPass
from tiny import VOCAB, tiny_tokenizer


def test_demo_with_every_quantizers_rows(tmp_path, monkeypatch, capsys):
    cfg = transformers.LlamaConfig(hidden_size=512, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=2,
                                   vocab_size=len(VOCAB), max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=3)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    monkeypatch.setattr(casp.cli.demo, "DEMO_MODEL", str(tmp_path / "model"))

    class QuickAQLM(AQLMPass):                     # one round, a short k-means: a smoke run
        def __init__(self, *a, **kw):
            super().__init__(*a, **{**kw, "max_rounds": 1, "kmeans_iterations": 2,
                                    "kmeans_max_points": 16})

    monkeypatch.setattr(casp.quant.aqlm.layer_pass, "AQLMPass", QuickAQLM)
    out = tmp_path / "demo"
    assert casp.cli.main(["demo", "--output", str(out), "--nsamples", "4", "--seqlen", "64",
                          "--max-windows", "2", "--gptq", "--aqlm", "--aqlm-steps", "2"]) == 0
    text = capsys.readouterr().out
    rows = {m.group(1): float(m.group(2)) for m in
            re.finditer(r"^\| (QuIP# E8P12|CASP_QuIP#|GPTQ 2-bit g128|CASP_GPTQ|AQLM 2x8|"
                        r"CASP_AQLM) \| ([0-9.]+) \|", text, re.M)}
    assert set(rows) == {"QuIP# E8P12", "CASP_QuIP#", "GPTQ 2-bit g128", "CASP_GPTQ",
                         "AQLM 2x8", "CASP_AQLM"}
    assert rows["CASP_QuIP#"] <= rows["QuIP# E8P12"] + 1e-4
    # each CASP row spends at most its baseline's average bits
    assert rows["CASP_GPTQ"] <= rows["GPTQ 2-bit g128"] + 1e-4
    assert rows["CASP_AQLM"] <= rows["AQLM 2x8"] + 1e-4
    for name in ("plan.json", "plan-gptq.json", "plan-aqlm.json", "casp-quip/config.json", "casp-aqlm/config.json", "aqlm-2x8/config.json"):
        assert (out / name).is_file()
