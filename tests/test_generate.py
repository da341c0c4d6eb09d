"""casp generate and casp.generation: the own KV-cache loop against transformers' generate,
seeded sampling, exact lengths, streaming, and the bad inputs refused in one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from casp.cli import main
from casp.generation import TextStream, generate, generate_ids, next_token, prompt_inputs
from casp.loading import load_pretrained
from tiny import save_tiny

PROMPT = "the cat is red and the dog is blue"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return save_tiny("llama", tmp_path_factory.mktemp("gen") / "llama", context=64)


@pytest.fixture(scope="module")
def llama(llama_dir):
    return load_pretrained(str(llama_dir), device="cpu")


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "red.png"
    pixels = np.zeros((28, 28, 3), dtype=np.uint8)
    pixels[..., 0] = 200
    Image.fromarray(pixels).save(path)
    return path


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.startswith("casp: error:")], err


def test_greedy_equals_transformers_generate(llama):
    inputs = dict(llama.tokenizer([PROMPT], return_tensors="pt"))
    for attention in ("eager", "sdpa"):
        llama.model.set_attn_implementation(attention)
        expected = llama.model.generate(**inputs, max_new_tokens=20, do_sample=False,
                                        eos_token_id=2, pad_token_id=3)
        expected = expected[0, inputs["input_ids"].shape[1]:].tolist()
        run = generate_ids(llama.model, inputs, max_new_tokens=20, end_ids=[2])
        assert run["token_ids"] == expected, attention
    llama.model.set_attn_implementation("eager")


def test_sampling_is_seeded_and_ignore_eos_is_exact(llama):
    kw = dict(max_new_tokens=12, temperature=1.0, top_p=0.9, chat_template=False,
              ignore_eos=True)
    a = generate(llama, PROMPT, seed=1, **kw)
    b = generate(llama, PROMPT, seed=1, **kw)
    c = generate(llama, PROMPT, seed=2, **kw)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert a.new_tokens == 12 and not a.stopped_at_end
    # every token but the first is timed as decode
    assert a.prefill_s > 0 and a.decode_tokens_per_s > 0 and a.peak_rss_mib > 10
    # stopping at an end token: greedy, with the first greedy token declared the end
    greedy = generate(llama, PROMPT, max_new_tokens=5, chat_template=False, ignore_eos=True)
    run = generate_ids(llama.model, dict(llama.tokenizer([PROMPT], return_tensors="pt")),
                       max_new_tokens=5, end_ids=[greedy.token_ids[0]])
    assert run["token_ids"] == greedy.token_ids[:1] and run["stopped_at_end"]


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    g = torch.Generator().manual_seed(0)
    drawn = {next_token(logits, 1.0, 0.7, g) for _ in range(200)}
    assert drawn == {0, 1}                      # 0.5 + 0.3 reaches 0.7: the rest never drawn
    assert {next_token(logits, 1.0, 0.4, g) for _ in range(50)} == {0}
    assert next_token(logits, 0.0, 1.0, None) == 0


def test_stream_writes_only_complete_text():
    class Tok:   # ids are bytes of UTF-8 text
        def decode(self, ids, skip_special_tokens=True):
            return bytes(ids).decode("utf-8", errors="replace")

    shown = []
    stream = TextStream(Tok(), shown.append)
    ids = list("é!".encode())                # é is two bytes
    for n in range(1, len(ids) + 1):
        stream(ids[:n])
    assert shown == ["é", "!"]


def test_cli_prints_text_and_summary(capsys, llama_dir):
    code, out, errors, err = run_cli(capsys, "generate", "--model", llama_dir, "--prompt",
                                     PROMPT, "--max-new-tokens", "6", "--threads", "1")
    assert code == 0 and not errors
    assert out.strip() and out.endswith("\n")
    summary = [line for line in err.splitlines() if line.startswith("prompt ")]
    assert len(summary) == 1
    assert f"prompt {len(PROMPT.split())} tokens" in summary[0]
    assert "tokens/s" in summary[0] and "peak RSS" in summary[0]


@pytest.mark.parametrize("case", ["missing", "image_on_text", "too_long", "zero_tokens",
                                  "missing_image", "bad_image"])
def test_bad_input_is_one_line(capsys, tmp_path, llama_dir, image_file, case):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    argv, expect = {
        "missing": (["--model", tmp_path / "nope"], "does not exist"),
        "image_on_text": (["--image", image_file], "takes text only; --image needs a LLaVA"),
        "too_long": (["--max-new-tokens", "60"], "longer than the model's context (64 tokens)"),
        "zero_tokens": (["--max-new-tokens", "0"], "--max-new-tokens 0 must be at least 1"),
        "missing_image": (["--image", tmp_path / "none.png"], "image file"),
        "bad_image": (["--image", bad], "could not read image"),
    }[case]
    if "--model" not in argv:
        argv = ["--model", llama_dir, *argv]
    code, out, errors, _ = run_cli(capsys, "generate", "--prompt", PROMPT, *argv)
    assert code == 2 and len(errors) == 1 and expect in errors[0], errors
    assert not out
    if case == "too_long":
        assert "prompt (9 tokens) plus --max-new-tokens 60 is 69" in errors[0]
        assert "use --max-new-tokens 55 or less" in errors[0]


def test_llava_with_an_image(capsys, tmp_path, image_file):
    src = save_tiny("llava", tmp_path / "llava")
    loaded = load_pretrained(str(src), device="cpu")
    res = generate(loaded, "what shape is this", image=image_file, max_new_tokens=4,
                   ignore_eos=True)
    image_id = loaded.model.config.image_token_index
    assert res.new_tokens == 4 and res.prompt_tokens > 4     # the image's tokens counted
    # the image reaches the reply: the same prompt with another image answers otherwise
    other = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28, 3),
                                                              dtype=np.uint8))
    logits = []
    for img in (Image.open(image_file), other):
        inputs = prompt_inputs(loaded, "what shape is this", img)
        assert (inputs["input_ids"] == image_id).sum() > 0
        with torch.no_grad():
            logits.append(loaded.model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])
    code, out, errors, err = run_cli(capsys, "generate", "--model", src, "--prompt",
                                     "what shape is this", "--image", image_file,
                                     "--max-new-tokens", "3")
    assert code == 0 and not errors and "prompt " in err


def test_cli_on_a_casp_checkpoint(capsys, tmp_path, llama_dir, calib_txt):
    out = tmp_path / "lowrank"
    assert main(["-q", "lowrank", "--model", str(llama_dir), "--output", str(out), "--dataset",
                 str(calib_txt), "--nsamples", "4", "--seqlen", "32"]) == 0
    capsys.readouterr()
    code, text, errors, err = run_cli(capsys, "generate", "--model", out, "--prompt", PROMPT,
                                      "--max-new-tokens", "4")
    assert code == 0 and not errors and text.strip() and "4 new tokens" in err
