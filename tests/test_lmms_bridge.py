"""The lmms-eval bridge: casp's registered lmms-eval model runs a casp checkpoint (low-rank and
GPTQ modules) through lmms-eval's own evaluator on the offline easy-vqa tasks, and what
lmms-eval reports (answer accuracy, answer perplexity, per question) equals casp's own
evaluation (casp.eval.vqa) of the same questions."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

import tiny
from casp.cli import main
from casp.data.easy_vqa import answers, load_split, question_text, subset
from casp.eval.lmms import LMMS_EVAL_VERSION, prepare_easy_vqa_task
from casp.eval.vqa import evaluate_vqa
from casp.loading import load_pretrained

ROOT = Path(__file__).resolve().parent.parent
CHAT = ["<|im_start|>", "<|im_end|>"]
SAMPLES = 8


@pytest.fixture(scope="module", autouse=True)
def lmms_eval_installed():
    if importlib.util.find_spec("lmms_eval") is None:
        if os.environ.get("CASP_NO_LMMS"):
            pytest.skip("lmms-eval left out (CASP_NO_LMMS)")
        pytest.fail("lmms-eval is not installed; run bash scripts/install.sh")


def _vocab() -> list[str]:
    words = set(tiny.WORDS) | set(answers()) | {"user", "assistant", "answer", "with", "one",
                                                "word", "."}
    for r in load_split("test"):
        words |= set(re.findall(r"\w+|[^\w\s]", r.question.lower()))
    return tiny.SPECIALS + CHAT + sorted(words - set(tiny.SPECIALS))


def _tokenizer(vocab):
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(tiny.SPECIALS + CHAT)
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="<|im_end|>",
        pad_token="<pad>", extra_special_tokens={"image_token": "<image>"})


@torch.no_grad()
def _answer_yes_or_no(model, processor, vocab, records, scale=4.0):
    """Turn the random model into one that answers yes or no, which one depending on image and
    question: the lm_head rows of the two words point in opposite directions along the main
    axis along which its final hidden states for these prompts differ."""
    from PIL import Image

    from casp.eval.vqa import user_prompt

    processor.tokenizer.padding_side = "left"
    enc = processor(images=[Image.open(r.image).convert("RGB") for r in records],
                    text=[user_prompt(processor, r) for r in records], return_tensors="pt",
                    padding=True)
    h = model(**enc, output_hidden_states=True).hidden_states[-1][:, -1]
    h = model.model.language_model.norm(h)
    axis = torch.linalg.svd(h - h.mean(0), full_matrices=False).Vh[0]
    model.lm_head.weight[vocab.index("yes")] = scale * axis
    model.lm_head.weight[vocab.index("no")] = -scale * axis


def save_easy_vqa_llava(directory: Path) -> Path:
    """A tiny random LLaVA whose word-level tokenizer knows easy-vqa's words, with the mini
    LLaVA's ChatML template, answering yes or no."""
    from casp.mini_llava.build import CHAT_TEMPLATE

    vocab = _vocab()
    tc = tiny.text_config(3, 256)
    tc.vocab_size, tc.eos_token_id = len(vocab), vocab.index("<|im_end|>")
    torch.manual_seed(0)
    config = transformers.LlavaConfig(
        text_config=tc.to_dict(), vision_config=tiny.vision_config().to_dict(),
        image_token_index=vocab.index("<image>"), vision_feature_select_strategy="default",
        vision_feature_layer=-2)
    model = transformers.LlavaForConditionalGeneration(config).eval()
    model.config.architectures = ["LlavaForConditionalGeneration"]
    processor = transformers.LlavaProcessor(
        image_processor=tiny._pil("CLIPImageProcessor")(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=_tokenizer(vocab), patch_size=14, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
    _answer_yes_or_no(model, processor, vocab, subset(load_split("test"), 64, seed=1))
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def casp_checkpoint(tmp_path_factory):
    """The tiny LLaVA through `casp lowrank` and `casp gptq`."""
    root = tmp_path_factory.mktemp("lmms")
    src = save_easy_vqa_llava(root / "src")
    calib = tiny.write_text(root / "calib.txt")
    data = ["--dataset", str(calib), "--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]
    assert main(["-q", "lowrank", "--model", str(src), "--output", str(root / "lr"),
                 "--compression", "0.5", *data]) == 0
    assert main(["-q", "gptq", "--model", str(root / "lr"), "--output", str(root / "q"),
                 "--bits", "4", "--group-size", "32", *data]) == 0
    section = json.loads((root / "q" / "config.json").read_text())["casp"]
    assert {d["type"] for d in section["modules"].values()} >= {"lowrank", "gptq"}
    return root / "q"


def _env(tmp_path, **extra) -> dict:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1",
            "CASP": str(Path(sys.executable).parent / "casp"), **extra}


def _per_question(model, processor, records) -> list[dict]:
    """casp's own evaluation of each question alone: correct or not, and the answer's
    negative log-likelihood."""
    rows = []
    for r in records:
        res = evaluate_vqa(model, processor, [r], batch_size=1)
        rows.append({"correct": res["accuracy"], "nll": math.log(res["answer_ppl_per_answer"])})
    return rows


def test_casp_checkpoint_through_lmms_eval_equals_casp_vqa(casp_checkpoint, tmp_path):
    out = tmp_path / "out"
    res = subprocess.run(
        ["bash", str(ROOT / "eval/scripts/lmms_eval_easy_vqa.sh")], capture_output=True,
        text=True, env=_env(tmp_path, MODEL=str(casp_checkpoint), SAMPLES=str(SAMPLES),
                            OUTPUT=str(out), TASK_DIR=str(tmp_path / "tasks")))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "easy_vqa: exact_match" in res.stdout
    results_file = next(out.rglob("*_results.json"))
    results = json.loads(results_file.read_text())
    assert results["model_source"] == "casp"         # found by name: the entry point works
    assert results["n-samples"]["easy_vqa"]["effective"] == SAMPLES

    records = subset(load_split("test"), SAMPLES, seed=0)
    loaded = load_pretrained(str(casp_checkpoint), device="cpu")
    ours = _per_question(loaded.model, loaded.processor, records)
    accuracy = sum(o["correct"] for o in ours) / SAMPLES
    assert 0 < accuracy < 1                          # the model is right on some questions only
    assert results["results"]["easy_vqa"]["exact_match,none"] == pytest.approx(accuracy)
    mean_nll = sum(o["nll"] for o in ours) / SAMPLES
    assert results["results"]["easy_vqa_ppl"]["perplexity,none"] == \
        pytest.approx(math.exp(mean_nll), rel=1e-4)

    # question by question: the same questions, the same verdicts, the same likelihoods
    samples = {t: {s["doc_id"]: s for s in map(json.loads, next(
        results_file.parent.glob(f"*_samples_{t}.jsonl")).read_text().splitlines())}
        for t in ("easy_vqa", "easy_vqa_ppl")}
    replies = set()
    for i, (r, o) in enumerate(zip(records, ours)):
        gen, ppl = samples["easy_vqa"][i], samples["easy_vqa_ppl"][i]
        assert gen["target"] == r.answer and gen["input"] == question_text(r)
        assert gen["exact_match"] == o["correct"]
        assert -ppl["perplexity"] == pytest.approx(o["nll"], rel=1e-4, abs=1e-5)
        replies.add(gen["filtered_resps"].split()[0])
    assert replies == {"yes", "no"}                  # the answers depend on the input


def test_offline_task_files(tmp_path):
    task_dir = prepare_easy_vqa_task(tmp_path / "t", samples=5, seed=2)
    assert {p.name for p in task_dir.iterdir()} == {"easy_vqa.yaml", "easy_vqa_ppl.yaml",
                                                    "utils.py", "easy_vqa_test.jsonl"}
    data = task_dir / "easy_vqa_test.jsonl"
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    records = subset(load_split("test"), 5, seed=2)    # what `casp vqa --samples 5 --seed 2` reads
    assert [(x["question"], x["answer"], x["prompt"]) for x in rows] == \
        [(r.question, r.answer, question_text(r)) for r in records]
    assert all(Path(x["image"]).is_file() for x in rows)
    before = data.stat().st_mtime_ns
    prepare_easy_vqa_task(task_dir, samples=5, seed=2)  # unchanged data is not rewritten
    assert data.stat().st_mtime_ns == before


def test_bad_model_path_is_one_line_error(tmp_path, capsys):
    assert main(["lmms-eval", "--model", str(tmp_path / "missing"), "--output",
                 str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("casp: error:") and "does not exist" in err[0]
    assert main(["lmms-eval", "--model", "someone/not-here", "--output", str(tmp_path / "o")]) == 2
    assert "--online" in capsys.readouterr().err


CHILD = r"""
import json, sys
from casp.errors import CaspError
from casp.eval.lmms import CaspLMMS, prepare_easy_vqa_task
try:
    CaspLMMS(pretrained=sys.argv[3])
    bad = None
except CaspError as exc:
    bad = str(exc)
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
from casp.data.easy_vqa import load_split, subset
from casp.eval.vqa import evaluate_vqa
n = int(sys.argv[4])
tasks = TaskManager(include_path=str(prepare_easy_vqa_task(sys.argv[2], samples=n)),
                    include_defaults=False)
model = CaspLMMS(pretrained=sys.argv[1], device="cpu")
ours = evaluate_vqa(model.model, model.processor, subset(load_split("test"), n), batch_size=1)
res = simple_evaluate(model=model, tasks=["easy_vqa", "easy_vqa_ppl"], task_manager=tasks,
                      bootstrap_iters=0)        # (it frees the model's weights at the end)
# a LLaVA-NeXT-Video model on videos given as frame directories
from lmms_eval.api.instance import Instance
video = CaspLMMS(pretrained=sys.argv[5], device="cpu", batch_size=2)
video.task_dict = {"v": {"test": [{"video": d} for d in sys.argv[6:]]}}
def request(kind, i):
    second = {"max_new_tokens": 3} if kind == "generate_until" else " red"
    return Instance(kind, ("what happens?", second, lambda doc: [doc["video"]], i, "v", "test"),
                    0, metadata={"task": "v", "doc_id": i, "repeats": 1})
replies = video.generate_until([request("generate_until", i) for i in range(2)])
video_ll = [ll for ll, _ in video.loglikelihood([request("loglikelihood", i) for i in range(2)])]
print("RESULT " + json.dumps({"bad": bad, "results": res["results"], "ours": ours,
                              "replies": replies, "video_ll": video_ll,
                              "modules": sorted(m for m in sys.modules
                                                if m.split(".")[0] in ("torchvision", "decord"))}))
"""


def _mini_llava(tmp_path) -> str:
    """The mini LLaVA (its projector untrained until the trained one is committed)."""
    from casp.mini_llava.build import PROJECTOR_FILE, assemble, mini_llava_dir

    if PROJECTOR_FILE.is_file():
        return str(mini_llava_dir())
    model, processor = assemble(projector=None)
    model.save_pretrained(tmp_path / "mini")
    processor.save_pretrained(tmp_path / "mini")
    return str(tmp_path / "mini")


def _frame_dirs(root: Path) -> list[str]:
    import numpy as np
    from PIL import Image

    dirs = []
    for v in range(2):
        d = root / f"video{v}"
        d.mkdir(parents=True)
        for f in range(10):
            pixels = np.random.RandomState(10 * v + f).randint(0, 256, (40, 40, 3), np.uint8)
            Image.fromarray(pixels).save(d / f"{f:03d}.png")
        dirs.append(str(d))
    return dirs


def test_mini_llava_through_simple_evaluate_with_a_model_instance(tmp_path):
    """simple_evaluate(model=CaspLMMS(...)) on the mini LLaVA equals casp vqa; a bad path is a
    one-line CaspError; videos reach a LLaVA-NeXT-Video model."""
    n = 4
    video_model = tiny.save_tiny("llava_next_video", tmp_path / "video-model")
    res = subprocess.run(
        [sys.executable, "-c", CHILD, _mini_llava(tmp_path), str(tmp_path / "tasks"),
         str(tmp_path / "missing"), str(n), str(video_model), *_frame_dirs(tmp_path)],
        capture_output=True, text=True,
        env=_env(tmp_path, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                 LMMS_EVAL_DATASETS_CACHE=str(tmp_path / "ds")))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    got = json.loads(next(l for l in res.stdout.splitlines() if l.startswith("RESULT "))[7:])
    assert got["bad"] and "does not exist" in got["bad"] and "\n" not in got["bad"]
    assert got["modules"] == []          # neither torchvision nor decord was imported
    assert got["results"]["easy_vqa"]["exact_match,none"] == pytest.approx(got["ours"]["accuracy"])
    # lmms-eval's perplexity aggregation: the mean over answers of each answer's NLL
    assert got["results"]["easy_vqa_ppl"]["perplexity,none"] == \
        pytest.approx(got["ours"]["answer_ppl_per_answer"], rel=1e-4)
    assert len(got["replies"]) == 2 and all(isinstance(r, str) for r in got["replies"])
    a, b = got["video_ll"]
    assert a < 0 and b < 0 and a != pytest.approx(b)   # the frames reach the model


def test_paper_task_scripts_pass_their_settings(tmp_path):
    stub = tmp_path / "casp"
    stub.write_text("#!/usr/bin/env bash\nprintf '%s\\n' \"$@\"\n")
    stub.chmod(0o755)
    expected = {
        "lmms_eval_llava.sh": "coco2017_cap_val,flickr30k_test,nocaps_val,gqa,mmbench_en_dev,"
                              "mme,mmmu_val,scienceqa_img,seedbench,live_bench,"
                              "llava_wilder_small,llava_bench_coco",
        "lmms_eval_llava_next_video.sh": "activitynetqa,videochatgpt_temporal,video_dc499,"
                                         "videomme,nextqa_oe_test",
    }
    for script, tasks in expected.items():
        res = subprocess.run(["bash", str(ROOT / "eval/scripts" / script)], capture_output=True,
                             text=True, env=_env(tmp_path, CASP=str(stub), LIMIT="5"))
        assert res.returncode == 0, res.stderr
        args = res.stdout.splitlines()
        assert args[0] == "lmms-eval" and "--online" in args
        assert args[args.index("--tasks") + 1] == tasks
        assert args[args.index("--limit") + 1] == "5"
    res = subprocess.run(["bash", str(ROOT / "eval/scripts/lmms_eval_llava_next_video.sh")],
                         capture_output=True, text=True,
                         env=_env(tmp_path, CASP=str(stub), NUM_FRAMES="16"))
    args = res.stdout.splitlines()
    assert args[args.index("--model-args") + 1] == "num_frames=16"


def test_install_pins_the_bridge_version():
    install = (ROOT / "scripts/install.sh").read_text()
    assert f"--no-deps \"${{LMMS_EVAL_SPEC:-lmms-eval=={LMMS_EVAL_VERSION}}}\"" in install
    pyproject = (ROOT / "pyproject.toml").read_text()
    extra = re.search(r"^lmms = \[(.*?)\]", pyproject, re.M | re.S).group(1).lower()
    assert "loguru" in extra
    assert not any(name in extra for name in ("torch", "decord", "lmms-eval", "lmms_eval"))
    assert '[project.entry-points."lmms_eval.models"]\ncasp = "casp.eval.lmms:lmms_eval_manifest"' \
        in pyproject
