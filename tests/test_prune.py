"""Pruning: masks of exact density, SparseGPT against the no-update rules under its own
Hessian, sparse storage round trips, the search's feasibility and resume, casp prune and
casp prune-search on tiny Llama and LLaVA models, bad input."""
import json

import pytest
import torch

from casp.checkpoint import checkpoint_size, load_checkpoint
from casp.cli import main
from casp.errors import CaspError
from casp.prune.layer_pass import PrunePass, weighted_error
from casp.prune.masks import Pattern, keep_mask, parse_nm, weight_scores
from casp.prune.profile import mean_sparsity, split_blocks
from casp.prune.sparse_linear import SparseLinear, pack_mask, stored_bytes, unpack_mask
from casp.prune.sparsegpt import sparsegpt_prune
from casp.prune.search import SearchSettings, search_space
from tiny import save_tiny

CALIB = ["--nsamples", "8", "--seqlen", "32", "--batch-size", "4"]


def run(*argv):
    return main([str(a) for a in argv])


def correlated_problem(seed: int, out_f: int = 48, in_f: int = 64, tokens: int = 512):
    """A weight and the Gram matrix of inputs with correlated, unequal channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(in_f, in_f, generator=g) / in_f**0.5 + torch.eye(in_f)
    scale = torch.rand(in_f, generator=g) * 3 + 0.1
    x = (torch.randn(tokens, in_f, generator=g) @ mix) * scale
    gram = x.T.double() @ x.double()
    return torch.randn(out_f, in_f, generator=g), gram, tokens


@pytest.mark.parametrize("score", ["magnitude", "wanda", "ria"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.6])
def test_unstructured_masks_have_exact_density_per_row(score, ratio):
    w, gram, n = correlated_problem(0, in_f=70)
    keep = keep_mask(weight_scores(w, score, gram.diagonal(), n), Pattern(ratio=ratio))
    assert (keep.sum(dim=1) == 70 - int(70 * ratio)).all()


@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_prune_n_of_every_m(nm):
    w, gram, n = correlated_problem(1)
    for method in ("magnitude", "wanda", "ria"):
        keep = keep_mask(weight_scores(w, method, gram.diagonal(), n), Pattern(n=nm[0], m=nm[1]))
        groups = keep.reshape(w.shape[0], -1, nm[1])
        assert (groups.sum(dim=2) == nm[1] - nm[0]).all()
    pruned, keep = sparsegpt_prune(w, 2 * gram.float() / n, Pattern(n=nm[0], m=nm[1]))
    assert (keep.reshape(w.shape[0], -1, nm[1]).sum(dim=2) == nm[1] - nm[0]).all()
    assert (pruned[~keep] == 0).all()


def test_wanda_keeps_the_weights_that_matter_for_the_output():
    """One loud input channel: Wanda keeps its weights where magnitude drops them."""
    w = torch.ones(4, 8)
    w[:, 0] = 0.1                       # small weights on channel 0 ...
    diag = torch.ones(8, dtype=torch.float64)
    diag[0] = 1e4                       # ... whose input is 100x larger
    wanda = keep_mask(weight_scores(w, "wanda", diag, 10), Pattern(ratio=0.5))
    magnitude = keep_mask(weight_scores(w, "magnitude"), Pattern(ratio=0.5))
    assert wanda[:, 0].all() and not magnitude[:, 0].any()


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("pattern", [Pattern(ratio=0.5), Pattern(ratio=0.7), Pattern(n=2, m=4)])
def test_sparsegpt_error_under_its_hessian_is_at_most_wanda_and_magnitude(seed, pattern):
    w, gram, n = correlated_problem(seed)
    hessian = (2 * gram / n).float()
    pruned, keep = sparsegpt_prune(w, hessian, pattern)
    # one block of 64 columns: exactly int(numel * ratio) weights go (N:M: N of every M)
    assert int((~keep).sum()) == int(w.numel() * pattern.sparsity)
    sparse_error = weighted_error(w, pruned, hessian)
    # at 70% the block-wise mask (chosen before the updates) can lose to Wanda's per-row
    # one on these problems (seed 0: 0.1235 against 0.1186); at 50% and 2:4 it never does
    scores = ("magnitude",) if pattern.sparsity > 0.6 else ("wanda", "magnitude", "ria")
    for score in scores:
        mask = keep_mask(weight_scores(w, score, gram.diagonal(), n), pattern)
        assert sparse_error <= weighted_error(w, w * mask, hessian), score
    # and the update matters: SparseGPT's own mask without the update is worse
    assert sparse_error < weighted_error(w, w * keep, hessian)


def test_sparse_storage_round_trips_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 19, generator=g)
    keep = torch.rand(5, 19, generator=g) > 0.4
    assert torch.equal(unpack_mask(pack_mask(keep), 19), keep)
    bias = torch.randn(5, generator=g)
    module = SparseLinear.from_weight(w * keep, keep, bias, "0.4")
    assert torch.equal(module.dense_weight(), w * keep)
    x = torch.randn(3, 19, generator=g)
    assert torch.allclose(module(x), x @ (w * keep).T + bias, atol=1e-6)
    rebuilt = SparseLinear.from_description(module.describe())
    rebuilt.load_state_dict(module.state_dict())
    assert torch.equal(rebuilt(x), module(x))
    assert stored_bytes(5, 19, int(keep.sum()), 4) == 5 * 3 + int(keep.sum()) * 4


def test_bad_patterns_are_refused():
    with pytest.raises(CaspError, match="less than M"):
        parse_nm("4:4")
    with pytest.raises(CaspError, match="N:M"):
        parse_nm("2-4")
    with pytest.raises(CaspError, match="outside"):
        PrunePass("wanda", ratio=1.0)
    with pytest.raises(CaspError, match="multiple"):
        keep_mask(torch.rand(2, 6), Pattern(n=2, m=4))


def test_blocks_and_search_space():
    assert [len(b) for b in split_blocks(30, 8)] == [4, 4, 4, 4, 4, 4, 3, 3]
    assert split_blocks(3, 3) == [[0], [1], [2]]
    s = SearchSettings(target=0.5)
    assert s.choices() == [0.45, 0.475, 0.5, 0.525, 0.55]
    blocks, names = search_space(SearchSettings(blocks=2, per_type=True), 4)
    assert blocks == [[0, 1], [2, 3]] and len(names) == 14
    shapes = {"a": (10, 64), "b": (30, 64)}
    # weighted by parameters: 0.25 * 640 + 0.75 * 1920 over 2560
    assert mean_sparsity({"a": 0.25, "b": 0.75}, shapes) == pytest.approx(0.625)
    # realized ratios: int(64 * 0.51) = 32 of 64
    assert mean_sparsity({"a": 0.51, "b": 0.51}, shapes) == pytest.approx(0.5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prune")
    return {kind: save_tiny(kind, root / kind, layers=4) for kind in ("llama", "llava")}


@pytest.mark.parametrize("kind", ["llama", "llava"])
@pytest.mark.parametrize("method,flags", [("magnitude", ["--ratio", "0.5"]),
                                          ("wanda", ["--ratio", "0.6"]),
                                          ("ria", ["--nm", "2:4"]),
                                          ("sparsegpt", ["--ratio", "0.5"]),
                                          ("sparsegpt", ["--nm", "4:8"])])
def test_casp_prune_writes_a_smaller_checkpoint_that_reloads(models, kind, method, flags,
                                                             tmp_path, calib_txt):
    from casp.loading import load_pretrained

    out = tmp_path / "pruned"
    assert run("prune", "--model", models[kind], "--output", out, "--method", method, *flags,
               "--dataset", calib_txt, *CALIB) == 0
    loaded = load_checkpoint(out)
    modules = loaded.casp["modules"]
    assert len(modules) == 4 * 7 and all(d["type"] == "sparse" for d in modules.values())
    want = 0.5 if "--nm" in flags else float(flags[1])
    for d in modules.values():
        assert d["kept"] == d["out_features"] * (d["in_features"]
                                                 - int(d["in_features"] * want))
    # on disk: mask + kept values, fp32 here, against 4 bytes a dense weight
    dense = load_pretrained(str(models[kind]))
    size = checkpoint_size(out)["weights_bytes"]
    dense_size = checkpoint_size(models[kind])["weights_bytes"]
    n = sum(d["in_features"] * d["out_features"] for d in modules.values())
    assert dense_size - size == pytest.approx(n * 4 - sum(
        stored_bytes(d["out_features"], d["in_features"], d["kept"], 4)
        for d in modules.values()), abs=64)
    # the reloaded model computes with exactly the pruned weights, and differs from dense
    ids = torch.randint(5, 40, (1, 12))
    layer = loaded.spec.decoder_layers(loaded.model)[1]
    weight = layer.get_submodule("mlp.down_proj").weight
    assert (weight == 0).float().mean() == pytest.approx(want, abs=0.01)
    with torch.no_grad():
        a = loaded.model(input_ids=ids).logits
        b = dense.model(input_ids=ids).logits
    assert not torch.allclose(a, b)


def test_pruned_model_reloaded_gives_the_in_memory_perplexity(models, tmp_path, calib_txt):
    from casp.data import load_documents, tokenize_documents
    from casp.eval.perplexity import perplexity
    from casp.layerwise import capture_layer_inputs, run_layerwise
    from casp.loading import load_pretrained
    from casp.data.calibration import calibration_batches
    from casp.cli.args import calibration_config
    import argparse

    out = tmp_path / "pruned"
    assert run("prune", "--model", models["llama"], "--output", out, "--method", "wanda",
               "--dataset", calib_txt, *CALIB) == 0
    args = argparse.Namespace(dataset=str(calib_txt), nsamples=8, seqlen=32, seed=3,
                              batch_size=4, split=None, text_field="text", mm_data=None,
                              image_root=None, num_frames=8)
    loaded = load_pretrained(str(models["llama"]))
    batches = calibration_batches(loaded, calibration_config(args))
    inputs = capture_layer_inputs(loaded.model, loaded.spec, batches, torch.device("cpu"))
    run_layerwise(loaded.model, loaded.spec, inputs, [PrunePass("wanda", 0.5)],
                  torch.device("cpu"), progress=False)
    ids = tokenize_documents(loaded.tokenizer, load_documents(str(calib_txt)))
    memory = perplexity(loaded.model, ids, 32, max_windows=8, progress=False).ppl
    reloaded = perplexity(load_checkpoint(out).model, ids, 32, max_windows=8,
                          progress=False).ppl
    assert reloaded == pytest.approx(memory, rel=1e-6)


def test_prune_search_feasibility_resume_and_profile(models, tmp_path, calib_txt, monkeypatch):
    import optuna

    from casp.prune import search

    profile = tmp_path / "profile.json"
    argv = ["prune-search", "--model", models["llama"], "--output", profile, "--target", "0.5",
            "--blocks", "2", "--trials", "3", "--val-windows", "4", "--dataset", calib_txt,
            *CALIB]
    evaluated = []
    original = search.PruneSearch.run_trial

    def counting(self, ratios):
        evaluated.append(mean_sparsity(ratios, self.shapes))
        if len(evaluated) == 2:
            raise KeyboardInterrupt          # killed during the second trial
        return original(self, ratios)

    monkeypatch.setattr(search.PruneSearch, "run_trial", counting)
    assert run(*argv) == 130 and not profile.exists()
    monkeypatch.setattr(search.PruneSearch, "run_trial",
                        lambda self, r: (evaluated.append(mean_sparsity(r, self.shapes)),
                                         original(self, r))[1])
    assert run(*[a if a != "3" else "4" for a in argv]) == 0
    study = optuna.load_study(study_name="casp-prune-search",
                              storage=f"sqlite:///{tmp_path / 'profile.study.db'}")
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4                   # the first run's trial counted, not redone
    assert len(evaluated) == 1 + 1 + 3          # 1 done, 1 killed, 3 after the resume
    assert all(m >= 0.5 - 1e-12 for m in evaluated)     # infeasible draws never evaluated
    for t in study.trials:
        if t.state.name == "PRUNED":
            assert t.user_attrs["mean_sparsity"] < 0.5
    assert complete[0].params == {"block0": 0.5, "block1": 0.5}    # uniform first
    data = json.loads(profile.read_text())
    assert data["mean_sparsity"] >= 0.5 and data["search"]["trials_completed"] == 4
    assert data["search"]["best_value"] == min(t.value for t in complete)
    # the profile applies, and the same study with other settings is refused
    out = tmp_path / "pruned"
    assert run("prune", "--model", models["llama"], "--profile", profile, "--output", out,
               "--dataset", calib_txt, *CALIB) == 0
    ratios = data["ratios"]
    for name, d in load_checkpoint(out).casp["modules"].items():
        assert d["kept"] == d["out_features"] * (d["in_features"]
                                                 - int(d["in_features"] * ratios[name]))
    bad = [a if a != "0.5" else "0.6" for a in argv]
    assert run(*bad) == 2


def test_fast_mode_thresholds_the_ranks_of_one_statistics_pass(models, tmp_path, calib_txt):
    """Fast mode at the uniform target prunes exactly as the statistics pass did."""
    import argparse

    from casp.cli.args import calibration_config
    from casp.data.calibration import calibration_batches
    from casp.layerwise import capture_layer_inputs
    from casp.loading import load_pretrained
    from casp.prune.search import PruneSearch

    args = argparse.Namespace(dataset=str(calib_txt), nsamples=8, seqlen=32, seed=3,
                              batch_size=4, split=None, text_field="text", mm_data=None,
                              image_root=None, num_frames=8)
    loaded = load_pretrained(str(models["llama"]))
    inputs = capture_layer_inputs(loaded.model, loaded.spec,
                                  calibration_batches(loaded, calibration_config(args)),
                                  torch.device("cpu"))
    results = {}
    for mode in ("fast", "exact"):
        s = PruneSearch(loaded, inputs, lambda m: 0.0, SearchSettings(target=0.5, blocks=2,
                        mode=mode), tmp_path / f"{mode}.db", {}, torch.device("cpu"))
        ratios = s.ratios({"block0": 0.5, "block1": 0.5})
        s.prune(ratios)
        results[mode] = {n: loaded.model.get_submodule(n).weight.detach().clone()
                         for n in s.shapes}
        s.restore()
    for name, w in results["exact"].items():
        assert torch.equal(w == 0, results["fast"][name] == 0), name
        assert (w == 0).float().mean() == pytest.approx(0.5)


def exit_code(*argv) -> int:
    try:
        return run(*argv)
    except SystemExit as exc:         # argparse's own refusals
        return exc.code


def test_bad_search_input(models, tmp_path, calib_txt, capsys):
    base = ["prune-search", "--model", models["llama"], "--output", tmp_path / "p.json",
            "--dataset", calib_txt, *CALIB, "--val-windows", "2", "--blocks", "2"]
    assert exit_code(*base, "--target", "1.0") == 2
    assert exit_code(*base, "--score", "sparsegpt") == 2
    assert exit_code(*base, "--target", "0.5", "--step", "0") == 2
    assert not (tmp_path / "p.json").exists()


def test_profile_of_another_model_is_refused(models, tmp_path, calib_txt):
    from casp.prune.profile import write_profile

    p = write_profile(tmp_path / "p.json", {"model.layers.0.mlp.up_proj": 0.5},
                      {"model.layers.0.mlp.up_proj": (128, 64)}, "LlamaForCausalLM", 1)
    assert run("prune", "--model", models["llama"], "--profile", p, "--output",
               tmp_path / "out", "--dataset", calib_txt, *CALIB) == 2
    assert not (tmp_path / "out").exists()
    (tmp_path / "junk.json").write_text("{}")
    assert run("prune", "--model", models["llama"], "--profile", tmp_path / "junk.json",
               "--output", tmp_path / "out", "--dataset", calib_txt, *CALIB) == 2
    assert run("prune", "--model", models["llama"], "--nm", "4:2", "--output",
               tmp_path / "out", "--dataset", calib_txt, *CALIB) == 2


def test_prune_search_counts_the_uniform_profile_feasible_where_rounding_lowers_it(
        models, tmp_path, calib_txt):
    """At 0.7 each row keeps in - int(in * 0.7) weights, so the uniform profile realizes less
    than 0.7 on these widths; it is still the first trial and the baseline of the summary."""
    from casp.loading import load_pretrained
    from casp.prune.profile import prunable_shapes
    from casp.prune.search import uniform_sparsity

    loaded = load_pretrained(str(models["llama"]))
    shapes = prunable_shapes(loaded.model, loaded.spec)
    assert uniform_sparsity(0.7, shapes) < 0.7                 # the case this test is about
    profile = tmp_path / "profile.json"
    assert run("prune-search", "--model", models["llama"], "--output", profile, "--target",
               "0.7", "--blocks", "2", "--trials", "2", "--val-windows", "4", "--dataset",
               calib_txt, *CALIB) == 0
    found = json.loads(profile.read_text())["search"]
    first = min(found["trials"], key=lambda t: t["number"])
    assert first["number"] == 0 and first["params"] == {"block0": 0.7, "block1": 0.7}
    assert found["uniform_value"] == first["value"]
    assert all(t["mean_sparsity"] >= uniform_sparsity(0.7, shapes) - 1e-6   # 6 digits kept
               for t in found["trials"])
