"""``casp lmms-eval``: lmms-eval tasks on a casp model through the lmms-eval bridge
(casp.eval.lmms)."""
from __future__ import annotations

from pathlib import Path

from casp.cli.args import positive
from casp.errors import CaspError
from casp.eval.lmms import OFFLINE_TASKS, run_lmms_eval, summary_lines


def cmd_lmms_eval(args) -> int:
    tasks = [t for t in args.tasks.split(",") if t]
    if not tasks:
        raise CaspError("--tasks is empty; give e.g. easy_vqa")
    if args.task_dir and Path(args.task_dir).is_file():
        raise CaspError(f"--task-dir {args.task_dir} is a file; give a directory")
    results = run_lmms_eval(args.model, tasks, args.output, samples=args.samples,
                            seed=args.seed, limit=args.limit, task_dir=args.task_dir,
                            online=args.online, batch_size=args.batch_size, device=args.device,
                            dtype=args.dtype, model_args=args.model_args)
    for line in summary_lines(results):
        print(line)
    print(f"lmms-eval results: {results['results_file']}")
    return 0


def add_parser(subparsers) -> None:
    """Register ``casp lmms-eval`` on the ``casp`` command's subparsers."""
    p = subparsers.add_parser(
        "lmms-eval", help="evaluate a model or casp checkpoint with lmms-eval (offline easy-vqa, "
                          "or the paper's tasks online)",
        description="Run lmms-eval (installed by scripts/install.sh) on a casp checkpoint or "
                    "model directory through casp's registered lmms-eval model `casp`. The "
                    "offline tasks easy_vqa (greedy answers, exact match after casp's answer "
                    "normalisation) and easy_vqa_ppl (perplexity of the reference answers) are "
                    "written from the easy-vqa wheel into a task folder first; hub tasks (gqa, "
                    "mme, ...) need --online. Writes lmms-eval's results JSON (and per-sample "
                    "logs) under --output and prints the metrics.")
    p.add_argument("--model", required=True,
                   help="a casp checkpoint, a LLaVA-family or Llama model directory, a hub id, "
                        "or 'mini-llava'")
    p.add_argument("--tasks", default="easy_vqa,easy_vqa_ppl",
                   help="lmms-eval tasks, comma-separated (default: the offline "
                        f"{','.join(OFFLINE_TASKS)})")
    p.add_argument("--samples", type=positive, default=500,
                   help="easy-vqa: this many test questions drawn at random, the same ones "
                        "`casp vqa --samples N --seed S` evaluates (default: 500, as casp vqa; "
                        "the test split has 9,673)")
    p.add_argument("--seed", type=int, default=0, help="easy-vqa: seed of the draw (default: 0)")
    p.add_argument("--limit", type=positive, default=None,
                   help="lmms-eval's --limit: only the first N documents of each task")
    p.add_argument("--batch-size", type=positive, default=1,
                   help="prompts per generate call (default: 1)")
    p.add_argument("--device", default="auto", help="compute device (default: auto)")
    p.add_argument("--dtype", default="auto",
                   help="weight dtype: auto (float16 on CUDA, float32 on CPU), float32, float16, "
                        "bfloat16")
    p.add_argument("--model-args", default=None,
                   help="more model_args for the casp model, e.g. max_new_tokens=64,num_frames=8")
    p.add_argument("--output", default="runs/lmms-eval",
                   help="lmms-eval's --output_path (default: runs/lmms-eval)")
    p.add_argument("--task-dir", default=None,
                   help="where to write the easy-vqa task files (default: under $CASP_CACHE, "
                        "one folder per --samples/--seed)")
    p.add_argument("--online", action="store_true",
                   help="let lmms-eval reach the Hugging Face hub (the paper's tasks); the "
                        "default runs with HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1")
    p.set_defaults(func=cmd_lmms_eval)
