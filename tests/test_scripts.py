"""The stage scripts run casp with their flags overridable from the environment."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny import save_tiny

ROOT = Path(__file__).resolve().parent.parent


def run_script(script, env_overrides):
    env = {**os.environ, "CASP": str(Path(sys.executable).parent / "casp"), **env_overrides}
    return subprocess.run(["bash", str(ROOT / script)], env=env, capture_output=True, text=True)


@pytest.mark.parametrize("script,kind", [("SVD/scripts/svd_llama.sh", "llama"),
                                         ("SVD/scripts/svd_llava.sh", "llava")])
def test_svd_scripts_with_overrides(script, kind, tmp_path, calib_txt):
    src = save_tiny(kind, tmp_path / "src")
    out = tmp_path / "out"
    res = run_script(script, {"MODEL": str(src), "OUTPUT": str(out), "DATASET": str(calib_txt),
                              "NSAMPLES": "4", "SEQLEN": "32", "COMPRESSION": "0.5"})
    assert res.returncode == 0, res.stderr[-2000:]
    section = json.loads((out / "config.json").read_text())["casp"]
    settings = section["stages"][0]["settings"]
    assert settings["passes"]["lowrank"]["compression"] == 0.5
    assert settings["calibration"]["seed"] == 3 and settings["calibration"]["nsamples"] == 4
    assert len(section["modules"]) == 6

    ppl_json = tmp_path / "ppl.json"
    res = run_script("eval/scripts/ppl.sh", {"MODEL": str(out), "DATASETS": str(calib_txt),
                                             "SPLIT": "all", "SEQLEN": "32", "MAX_WINDOWS": "3",
                                             "OUTPUT": str(ppl_json)})
    assert res.returncode == 0, res.stderr[-2000:]
    row = json.loads(ppl_json.read_text())[0]
    assert row["windows"] == 3 and row["tokens"] == 3 * 31 and row["ppl"] > 1


def test_script_reports_bad_input_in_one_line(tmp_path):
    res = run_script("SVD/scripts/svd_llama.sh", {"MODEL": str(tmp_path / "missing"),
                                                  "OUTPUT": str(tmp_path / "o")})
    assert res.returncode != 0
    errors = [l for l in res.stderr.splitlines() if l.startswith("casp: error:")]
    assert len(errors) == 1 and "does not exist" in errors[0]


def test_gptq_end_to_end_script_on_a_tiny_llama(tmp_path, calib_txt):
    src = save_tiny("llama", tmp_path / "base")
    work = tmp_path / "work"
    small = {"NSAMPLES": "4", "SEQLEN": "32", "DATASET": str(calib_txt)}
    env = {"BASE_MODEL": str(src), "NAME": "tiny", "WORK": str(work),
           **{f"SVD_{k}": v for k, v in small.items()},
           **{f"GPTQ_{k}": v for k, v in small.items()},
           "GPTQ_GROUP_SIZE": "32", "EVAL_DATASETS": str(calib_txt), "EVAL_SPLIT": "all",
           "EVAL_SEQLEN": "32", "EVAL_MAX_WINDOWS": "2"}
    res = run_script("scripts/casp_gptq_llama.sh", env)
    assert res.returncode == 0, res.stderr[-3000:]
    casp_cfg = json.loads((work / "tiny-casp-gptq" / "config.json").read_text())["casp"]
    base_cfg = json.loads((work / "tiny-gptq-2bit" / "config.json").read_text())["casp"]
    assert [s["stage"] for s in casp_cfg["stages"]] == ["lowrank", "gptq"]
    assert [s["stage"] for s in base_cfg["stages"]] == ["gptq"]
    plan = json.loads((work / "tiny-casp-gptq.plan.json").read_text())
    assert plan["allowed_bits"] == [2, 3] and plan["factor_bits"] == 3
    assert (work / "tiny-casp-gptq.plan.png").is_file()
    from casp.allocation import average_bits

    # CASP spends exactly the baseline's budget (never more)
    assert average_bits(casp_cfg) <= average_bits(base_cfg) + 1e-9
    assert plan["budget_bits"] == pytest.approx(average_bits(base_cfg))
    for name in ("base", "tiny-gptq-2bit", "tiny-casp-gptq"):
        rows = json.loads((work / f"{name}-ppl.json").read_text())
        assert rows[0]["windows"] == 2 and rows[0]["ppl"] > 1


def test_gptq_llava_scripts_pass_their_flags(tmp_path, calib_txt):
    src = save_tiny("llava", tmp_path / "src")
    out = tmp_path / "q"
    res = run_script("GPTQ/scripts/quantize_llava_baseline.sh", {
        "MODEL": str(src), "OUTPUT": str(out), "DATASET": str(calib_txt), "NSAMPLES": "4",
        "SEQLEN": "32", "BITS": "3", "GROUP_SIZE": "32", "STATIC_GROUPS": "1", "DAMP": "0.02"})
    assert res.returncode == 0, res.stderr[-2000:]
    stage = json.loads((out / "config.json").read_text())["casp"]["stages"][0]
    gptq = stage["settings"]["passes"]["gptq"]
    assert (gptq["bits"], gptq["group_size"], gptq["static_groups"], gptq["damp"]) == (3, 32, True, 0.02)
    assert stage["settings"]["calibration"]["nsamples"] == 4


def test_aqlm_end_to_end_script_on_a_tiny_llama(tmp_path, calib_txt):
    src = save_tiny("llama", tmp_path / "base")
    work = tmp_path / "work"
    small = {"NSAMPLES": "4", "SEQLEN": "32", "DATASET": str(calib_txt)}
    # 2x8 codebooks (65,536 bits each) would dwarf 64-wide matrices: 16-entry codebooks
    env = {"BASE_MODEL": str(src), "NAME": "tiny", "WORK": str(work),
           **{f"SVD_{k}": v for k, v in small.items()},
           **{f"AQLM_{k}": v for k, v in small.items()},
           "AQLM_CODEBOOKS": "2x4", "AQLM_IN_GROUP_SIZE": "4",
           "AQLM_CODEBOOK_MAP": "2=2x4g4,3=3x4g4", "AQLM_MAX_ROUNDS": "2",
           "AQLM_STEPS_PER_ROUND": "5", "EVAL_DATASETS": str(calib_txt), "EVAL_SPLIT": "all",
           "EVAL_SEQLEN": "32", "EVAL_MAX_WINDOWS": "2"}
    res = run_script("scripts/casp_aqlm_llama.sh", env)
    assert res.returncode == 0, res.stderr[-3000:]
    casp_cfg = json.loads((work / "tiny-casp-aqlm" / "config.json").read_text())["casp"]
    base_cfg = json.loads((work / "tiny-aqlm-2x8" / "config.json").read_text())["casp"]
    assert [s["stage"] for s in casp_cfg["stages"]] == ["lowrank", "aqlm"]
    assert casp_cfg["stages"][0]["settings"]["passes"]["lowrank"]["rank_multiple"] == 8
    aqlm = casp_cfg["stages"][1]["settings"]["passes"]["aqlm"]
    assert (aqlm["max_rounds"], aqlm["steps_per_round"], aqlm["tolerance"]) == (2, 5, 0.01)
    plan = json.loads((work / "tiny-casp-aqlm.plan.json").read_text())
    assert plan["quantizer"] == "aqlm" and plan["allowed_bits"] == [2, 3]
    assert plan["codebooks"] == {"2": "2x4g4", "3": "3x4g4"}
    factors = [m for n, m in plan["modules"].items() if n.endswith((".down", ".up"))]
    assert factors and {m["codebooks"] for m in factors} == {"3x4"}      # 3-bit factors
    from casp.allocation import average_bits

    assert average_bits(casp_cfg) <= average_bits(base_cfg) + 1e-9
    for name in ("base", "tiny-aqlm-2x8", "tiny-casp-aqlm"):
        rows = json.loads((work / f"{name}-ppl.json").read_text())
        assert rows[0]["windows"] == 2 and rows[0]["ppl"] > 1


def test_quip_end_to_end_script_on_a_tiny_llama(tmp_path, calib_txt):
    """svd -> hfize (Hessians of the low-rank model) -> quantize_finetune with a plan ->
    baseline from the original model's own Hessians -> perplexity."""
    src = save_tiny("llama", tmp_path / "base")
    work = tmp_path / "work"
    small = {"NSAMPLES": "4", "SEQLEN": "32", "DATASET": str(calib_txt)}
    env = {"BASE_MODEL": str(src), "NAME": "tiny", "WORK": str(work),
           **{f"SVD_{k}": v for k, v in small.items()},
           **{f"QUIP_{k}": v for k, v in small.items()},
           "QUIP_SIGMA_REG": "0.02", "EVAL_DATASETS": str(calib_txt), "EVAL_SPLIT": "all",
           "EVAL_SEQLEN": "32", "EVAL_MAX_WINDOWS": "2"}
    res = run_script("scripts/casp_quip_llama.sh", env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert len(list((work / "tiny-svd-hessians").glob("layer_*.safetensors"))) == 3
    assert len(list((work / "tiny-hessians").glob("layer_*.safetensors"))) == 3
    casp_cfg = json.loads((work / "tiny-casp-quip" / "config.json").read_text())["casp"]
    base_cfg = json.loads((work / "tiny-quip-e8p12" / "config.json").read_text())["casp"]
    assert [s["stage"] for s in casp_cfg["stages"]] == ["lowrank", "quip"]
    assert [s["stage"] for s in base_cfg["stages"]] == ["quip"]
    quip = casp_cfg["stages"][1]["settings"]["passes"]["quip"]
    assert quip["hessians"] == str(work / "tiny-svd-hessians") and quip["sigma_reg"] == 0.02
    assert base_cfg["stages"][0]["settings"]["passes"]["quip"]["hessians"] == \
        str(work / "tiny-hessians")
    plan = json.loads((work / "tiny-casp-quip.plan.json").read_text())
    assert plan["quantizer"] == "quip" and plan["allowed_bits"] == [2, 3]
    factors = [m for n, m in plan["modules"].items() if n.endswith((".down", ".up"))]
    assert factors and {m["quip_codebook"] for m in factors} == {"e8p12rvq3b"}  # 3-bit factors
    from casp.allocation import average_bits

    assert average_bits(casp_cfg) <= average_bits(base_cfg) + 1e-9
    assert plan["budget_bits"] == pytest.approx(average_bits(base_cfg))
    for name in ("base", "tiny-quip-e8p12", "tiny-casp-quip"):
        rows = json.loads((work / f"{name}-ppl.json").read_text())
        assert rows[0]["windows"] == 2 and rows[0]["ppl"] > 1


def test_measured_script_on_a_tiny_llama(tmp_path, calib_txt):
    """scripts/casp_measured.sh: measured plan -> lowrank --plan -> GPTQ, at the budget,
    then end-to-end fine-tuning."""
    src = save_tiny("llama", tmp_path / "base")
    out = tmp_path / "casp-m"
    res = run_script("scripts/casp_measured.sh", {
        "MODEL": str(src), "OUTPUT": str(out), "DATASET": str(calib_txt), "NSAMPLES": "8",
        "SEQLEN": "32", "BATCH_SIZE": "4", "SEARCH_SAMPLES": "4", "GROUP_SIZE": "32",
        "BUDGET": "3.1", "ALLOWED_BITS": "2,3", "RANK_MULTIPLE": "1", "FINETUNE_EPOCHS": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    tuned = json.loads((tmp_path / "casp-m-ft" / "config.json").read_text())["casp"]
    assert [s["stage"] for s in tuned["stages"]] == ["lowrank", "gptq", "finetune"]
    plan = json.loads(Path(f"{out}.plan.json").read_text())
    section = json.loads((out / "config.json").read_text())["casp"]
    assert [s["stage"] for s in section["stages"]] == ["lowrank", "gptq"]
    lowrank = {n: d["rank"] for n, d in section["modules"].items() if d["type"] == "lowrank"}
    assert lowrank == plan["lowrank"]["ranks"] and lowrank
    from casp.allocation import average_bits
    assert average_bits(section) == pytest.approx(plan["achieved_bits"]) and \
        plan["achieved_bits"] <= 3.1


def test_optspa_search_and_baseline_scripts_on_a_tiny_llava(tmp_path, calib_txt):
    src = save_tiny("llava", tmp_path / "src", layers=4)
    small = {"MODEL": str(src), "DATASET": str(calib_txt), "NSAMPLES": "4", "SEQLEN": "32"}
    out = tmp_path / "searched"
    res = run_script("Optspa/scripts/search_llava.sh", {
        **small, "OUTPUT": str(out), "BLOCKS": "2", "TRIALS": "3", "VAL_WINDOWS": "2",
        "MODE": "fast", "TARGET": "0.6"})
    assert res.returncode == 0, res.stderr[-2000:]
    profile = json.loads((tmp_path / "searched.profile.json").read_text())
    assert profile["target"] == 0.6 and len(profile["block_ratios"]) == 2
    assert profile["search"]["settings"]["tolerance"] == 0.005
    assert profile["search"]["trials_completed"] == 3
    stage = json.loads((out / "config.json").read_text())["casp"]["stages"][0]
    prune = stage["settings"]["passes"]["prune"]
    assert prune["method"] == "ria" and prune["profile"] is not None
    assert stage["settings"]["calibration"]["seed"] == 0
    assert profile["mean_sparsity"] >= 0.6 - 0.005

    out = tmp_path / "sgpt"
    res = run_script("Optspa/scripts/prune_sparsegpt_llava.sh",
                     {**small, "OUTPUT": str(out), "NM": "2:4"})
    assert res.returncode == 0, res.stderr[-2000:]
    prune = json.loads((out / "config.json").read_text())["casp"]["stages"][0]["settings"][
        "passes"]["prune"]
    assert (prune["method"], prune["nm"]) == ("sparsegpt", [2, 4])
