"""The lmms-eval bridge: casp's model registered in lmms-eval, and an offline easy-vqa task.

- The model ``casp`` (:class:`casp.eval.lmms_model.CaspLMMS`, exposed here lazily as
  ``CaspLMMS``) loads any casp checkpoint or LLaVA-family / Llama model directory. lmms-eval
  finds it through the ``lmms_eval.models`` entry point (``lmms_eval_manifest``), so
  ``python -m lmms_eval --model casp --model_args pretrained=DIR ...`` works once casp is
  installed, and ``simple_evaluate(model=CaspLMMS(pretrained=DIR), ...)`` works as well.
- The tasks ``easy_vqa`` (greedy answers, exact match after ``normalize_answer``) and
  ``easy_vqa_ppl`` (perplexity of the reference answers) read local JSON lines written from
  the easy-vqa wheel: :func:`prepare_easy_vqa_task` writes a task folder for ``--include_path``.
- ``casp lmms-eval`` prepares that folder and runs lmms-eval's command line on a model, offline
  (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1) unless ``--online``, writing lmms-eval's results
  JSON under ``--output``.

Nothing here imports lmms-eval at import time: casp works without it.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from casp.errors import CaspError

log = logging.getLogger("casp")

LMMS_EVAL_VERSION = "0.7.3"
TASKS_SOURCE = Path(__file__).with_name("lmms_tasks") / "easy_vqa"
OFFLINE_TASKS = ("easy_vqa", "easy_vqa_ppl")
DATA_FILE = "easy_vqa_test.jsonl"
INSTALL_HINT = ("bash scripts/install.sh installs it; by hand: pip install -e '.[lmms]' && "
                f"pip install --no-deps lmms-eval=={LMMS_EVAL_VERSION}")


def __getattr__(name):
    if name == "CaspLMMS":        # imports lmms-eval only when the class is asked for
        from casp.eval.lmms_model import CaspLMMS

        return CaspLMMS
    raise AttributeError(name)


def lmms_eval_manifest():
    """The ``lmms_eval.models`` entry point: lmms-eval's model registry calls this."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="casp", simple_class_path="casp.eval.lmms_model.CaspLMMS")


def check_lmms_eval() -> str:
    """lmms-eval's version; a clear error when it is missing."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        found = version("lmms-eval")
    except PackageNotFoundError:
        raise CaspError(f"lmms-eval is not installed; {INSTALL_HINT}")
    if found != LMMS_EVAL_VERSION:
        log.warning("lmms-eval %s is installed; casp's bridge was made for %s", found,
                    LMMS_EVAL_VERSION)
    return found


# ---------------------------------------------------------------------- the offline task
def easy_vqa_rows(samples: int | None = None, seed: int = 0) -> list[dict]:
    """The task's documents: the questions ``casp vqa --samples N --seed S`` evaluates (the
    whole test split in file order when ``samples`` is None), with the prompt casp uses."""
    from casp.data.easy_vqa import load_split, question_text, subset
    from casp.eval.vqa import question_type

    return [{"question_id": i, "question": r.question, "prompt": question_text(r),
             "answer": r.answer, "question_type": question_type(r),
             "image": str(Path(r.image).resolve()), "image_id": r.image_id}
            for i, r in enumerate(subset(load_split("test"), samples, seed))]


def _write_if_changed(path: Path, text: str) -> None:
    """Atomic, and untouched when equal (its datasets cache entry stays valid)."""
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def default_task_dir(samples: int | None, seed: int) -> Path:
    from casp.assets import cache_dir

    return cache_dir() / "lmms-tasks" / f"easy_vqa-{samples or 'all'}-seed{seed}"


def prepare_easy_vqa_task(task_dir: str | Path | None = None, samples: int | None = None,
                          seed: int = 0) -> Path:
    """Write the offline easy-vqa tasks (YAML, utils, the questions as JSON lines with image
    paths) into ``task_dir``; give it to lmms-eval as ``--include_path``."""
    if samples is not None and samples < 1:
        raise CaspError(f"asked for {samples} easy-vqa samples; give a positive number")
    task_dir = Path(task_dir) if task_dir else default_task_dir(samples, seed)
    task_dir.mkdir(parents=True, exist_ok=True)
    for source in sorted(TASKS_SOURCE.iterdir()):
        if source.suffix == ".yaml" or source.name == "utils.py":
            _write_if_changed(task_dir / source.name, source.read_text(encoding="utf-8"))
    rows = easy_vqa_rows(samples, seed)
    _write_if_changed(task_dir / DATA_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    return task_dir


# ---------------------------------------------------------------------- running lmms-eval
def _model_args(model: str, device: str, dtype: str, extra: str | None) -> str:
    if "," in model or "=" in model:
        raise CaspError(f"model path {model!r} contains ',' or '=', which lmms-eval's "
                        "--model_args cannot carry; rename or link it")
    args = f"pretrained={model},device={device},dtype={dtype}"
    return f"{args},{extra}" if extra else args


def lmms_eval_command(model: str, tasks: list[str], output: str | Path,
                      include_path: str | Path | None = None, limit: int | None = None,
                      batch_size: int = 1, device: str = "auto", dtype: str = "auto",
                      model_args: str | None = None, log_samples: bool = True,
                      extra: list[str] | None = None) -> list[str]:
    """lmms-eval's own command line for the ``casp`` model."""
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "casp",
           "--model_args", _model_args(model, device, dtype, model_args),
           "--tasks", ",".join(tasks), "--batch_size", str(batch_size),
           "--output_path", str(output)]
    if include_path:
        cmd += ["--include_path", str(include_path)]
    if limit is not None:
        cmd += ["--limit", str(limit)]
    if log_samples:
        cmd += ["--log_samples"]
    return cmd + list(extra or [])


def _check_model(model: str, online: bool) -> None:
    """Refuse a model that cannot load before lmms-eval starts (it would print a traceback and
    exit 0)."""
    from casp.loading import locate

    location, kwargs = locate(model)
    if not online and not Path(location).exists():
        raise CaspError(f"model {model} is not a local directory and the run is offline; check "
                        "the path, or pass --online to fetch it from the hub")
    if Path(location).is_dir() and "gguf_file" not in kwargs:
        from casp.checkpoint import read_casp_section

        read_casp_section(location)    # a corrupt config.json is refused here


def run_lmms_eval(model: str, tasks: list[str], output: str | Path, samples: int | None = None,
                  seed: int = 0, limit: int | None = None, task_dir: str | Path | None = None,
                  online: bool = False, batch_size: int = 1, device: str = "auto",
                  dtype: str = "auto", model_args: str | None = None,
                  extra: list[str] | None = None) -> dict:
    """Run lmms-eval on ``model`` in a child process; returns the results JSON it wrote (with
    its path under ``"results_file"``)."""
    check_lmms_eval()
    _check_model(model, online)
    include = None
    if any(t in OFFLINE_TASKS for t in tasks):
        include = prepare_easy_vqa_task(task_dir, samples, seed)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    cmd = lmms_eval_command(model, tasks, output, include, limit, batch_size, device, dtype,
                            model_args, extra=extra)
    env = dict(os.environ)
    if not online:
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if include is not None:   # the task's Arrow cache beside its data, not in ~/.cache
        env.setdefault("LMMS_EVAL_DATASETS_CACHE", str(Path(include) / ".datasets-cache"))
    print("casp: running " + " ".join(cmd[1:]), file=sys.stderr)
    started = time.time()
    code = subprocess.call(cmd, env=env)
    written = [p for p in output.rglob("*_results.json") if p.stat().st_mtime >= started - 1]
    if code != 0:
        raise CaspError(f"lmms-eval failed (exit code {code}); its messages are above")
    if not written:    # lmms-eval reports an error in evaluation and exits 0
        raise CaspError("lmms-eval wrote no results; the error it printed is above")
    path = max(written, key=lambda p: p.stat().st_mtime)
    results = json.loads(path.read_text())
    results["results_file"] = str(path)
    return results


def summary_lines(results: dict) -> list[str]:
    lines = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in metrics.items():
            name = key.partition(",")[0]
            if key == "alias" or "_stderr" in name or not isinstance(value, (int, float)):
                continue
            n = results.get("n-samples", {}).get(task, {}).get("effective")
            lines.append(f"{task}: {name} {value:.4f}" + (f" ({n} samples)" if n else ""))
    return lines
