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
