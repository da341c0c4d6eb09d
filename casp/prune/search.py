"""The adaptive-sparsity search of the seed paper (arXiv 2507.20613; its authors' code,
"optspa"): the Tree-structured Parzen Estimator (optuna's TPESampler) picks one pruning
ratio per block of consecutive decoder layers (or per linear type per block), each from
target +- spread in steps; a trial whose parameter-weighted mean sparsity is below what the
uniform profile at the target realizes (rounding each row's cut down can leave that just under
the target) is infeasible (pruned at once, never evaluated); a feasible one is pruned with a
rule that updates no weight and scored on held-out validation data. The study lives in an SQLite file
(optuna's RDB storage): a killed search resumes where it stopped.

Two ways to run a trial:
- "exact" (the authors'): prune layer by layer from the dense model, each layer's statistics
  from inputs through the already pruned layers, as ``casp prune`` does;
- "fast": the statistics are collected once, along a uniform pruning at the target, and
  kept as each weight's rank within its row; a trial only thresholds those ranks (the
  per-trial cost is then the validation pass alone).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from casp.errors import CaspError
from casp.identity import fingerprint
from casp.layerwise import LayerInputs, run_layerwise
from casp.prune.layer_pass import PrunePass
from casp.prune.masks import SCORES, check_ratio, row_ranks, weight_scores
from casp.prune.profile import (linear_type, mean_sparsity, ratios_from_blocks, realized,
                                split_blocks)

log = logging.getLogger("casp")
MODES = ("exact", "fast")
LINEAR_TYPES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SearchSettings:
    """What a study is of; a study file made with other settings is refused."""

    target: float = 0.5
    blocks: int = 8
    spread: float = 0.05
    step: float = 0.025
    per_type: bool = False
    score: str = "ria"
    mode: str = "exact"
    tolerance: float = 0.0
    seed: int = 0
    objective: str = "text"

    def check(self) -> None:
        check_ratio(self.target, "--target")
        if self.score not in SCORES:
            raise CaspError(f"--score {self.score!r}: the search prunes with a rule that updates "
                            f"no weight; use one of {', '.join(SCORES)}")
        if self.mode not in MODES:
            raise CaspError(f"--mode {self.mode!r}: use exact or fast")
        if not self.step > 0 or self.spread < 0:
            raise CaspError("--step must be positive and --spread at least 0")

    def choices(self) -> list[float]:
        """Each block's ratios: target - spread ... target + spread, inside [0, 1)."""
        k = int(round(self.spread / self.step))
        values = [round(self.target + i * self.step, 6) for i in range(-k, k + 1)]
        return [v for v in values if 0 <= v < 1]


def search_space(settings: SearchSettings, n_layers: int) -> tuple[list[list[int]], list[str]]:
    """The blocks and the parameter names: "block3" or "block3.q_proj" (per type)."""
    blocks = split_blocks(n_layers, settings.blocks)
    if settings.per_type:
        names = [f"block{b}.{t}" for b in range(len(blocks)) for t in LINEAR_TYPES]
    else:
        names = [f"block{b}" for b in range(len(blocks))]
    return blocks, names


def block_ratios_of(params: dict[str, float], n_blocks: int) -> list[dict[str, float]]:
    entries = [{} for _ in range(n_blocks)]
    for name, value in params.items():
        block, _, kind = name.partition(".")
        entries[int(block[len("block"):])][kind or "all"] = value
    return entries


class PruneSearch:
    """One study: ``evaluate(model) -> float`` (lower is better) on held-out data; the model
    is the dense ``loaded.model``, pruned in place for each trial and restored after it.

    Args:
        loaded: the dense model (LoadedModel).
        inputs: layer 0's captured calibration inputs (kept; each trial copies the list).
        evaluate: the objective on the pruned model.
        settings: the search space and rule.
        storage: the SQLite file of the study.
        identity: what the study is of besides ``settings`` (model, calibration, objective
            data): a study file of anything else is refused.
        device: compute device of the layer-wise passes.
    """

    def __init__(self, loaded, inputs: LayerInputs, evaluate: Callable[[torch.nn.Module], float],
                 settings: SearchSettings, storage: str | Path, identity: dict,
                 device: torch.device):
        settings.check()
        self.loaded, self.inputs, self.evaluate = loaded, inputs, evaluate
        self.settings, self.device = settings, device
        self.spec = loaded.spec
        from casp.prune.profile import prunable_shapes

        self.shapes = prunable_shapes(loaded.model, self.spec)
        self.n_layers = len(self.spec.decoder_layers(loaded.model))
        self.blocks, self.names = search_space(settings, self.n_layers)
        # the floor a trial must reach: what the uniform profile at the target realizes (at
        # most the target: a row keeps in - int(in * ratio) weights), so the uniform profile,
        # always among the choices, is feasible and every target reachable
        self.floor = uniform_sparsity(settings.target, self.shapes) - settings.tolerance
        self.dense = {n: self._linear(n).weight.data.clone() for n in self.shapes}
        self.ranks: dict[str, torch.Tensor] | None = None
        self.storage = Path(storage)
        self.key = fingerprint({"settings": asdict(settings), "identity": identity})
        self.study = self._open_study()

    def _linear(self, name: str):
        return self.loaded.model.get_submodule(name)

    # -- the study ----------------------------------------------------------------------

    def _open_study(self):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.storage.parent.mkdir(parents=True, exist_ok=True)
        existed = self.storage.is_file()
        sampler = optuna.samplers.TPESampler(seed=self.settings.seed)
        try:
            study = optuna.create_study(study_name="casp-prune-search",
                                        storage=f"sqlite:///{self.storage}", sampler=sampler,
                                        direction="minimize", load_if_exists=True)
        except Exception as exc:          # not an optuna database
            raise CaspError(f"--study {self.storage} cannot be opened as an optuna study "
                            f"({str(exc).splitlines()[0]}); give a new file path")
        stored = study.user_attrs.get("key")
        if existed and stored is not None and stored != self.key:
            raise CaspError(f"--study {self.storage} holds a search with other settings or of "
                            "another model; give a new --study path, or the settings it was "
                            f"made with ({study.user_attrs.get('settings')})")
        if stored is None:
            study.set_user_attr("key", self.key)
            study.set_user_attr("settings", asdict(self.settings))
        return study

    def completed(self) -> list:
        import optuna

        return [t for t in self.study.trials if t.state == optuna.trial.TrialState.COMPLETE]

    # -- one trial ----------------------------------------------------------------------

    def ratios(self, params: dict[str, float]) -> dict[str, float]:
        return ratios_from_blocks(block_ratios_of(params, len(self.blocks)), self.blocks,
                                  self.shapes, self.spec)

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.dense.items():
                self._linear(name).weight.data.copy_(weight)

    def _collect_ranks(self) -> None:
        """Fast mode: every linear's row ranks of the score, along a uniform pruning at the
        target (the statistics a trial reuses)."""
        log.info("fast mode: collecting the %s statistics once (uniform %.3g)",
                 self.settings.score, self.settings.target)
        recorder = RankRecorder(self.settings.score, self.settings.target)
        inputs = LayerInputs(list(self.inputs.hidden), self.inputs.kwargs)
        run_layerwise(self.loaded.model, self.spec, inputs, [recorder], self.device,
                      progress=False)
        self.ranks = recorder.ranks
        self.restore()

    def prune(self, ratios: dict[str, float]) -> None:
        """The dense model pruned in place at ``ratios``, in this search's mode."""
        self.restore()
        if self.settings.mode == "fast":
            if self.ranks is None:
                self._collect_ranks()
            with torch.no_grad():
                for name, ranks in self.ranks.items():
                    cut = int(ranks.shape[1] * ratios.get(name, 0.0))
                    self._linear(name).weight.data.mul_((ranks >= cut).to(self.dense[name].dtype))
            return
        prune = PrunePass(self.settings.score, ratio=0.0, ratios=ratios, store="masked")
        inputs = LayerInputs(list(self.inputs.hidden), self.inputs.kwargs)
        run_layerwise(self.loaded.model, self.spec, inputs, [prune], self.device, progress=False)

    def run_trial(self, ratios: dict[str, float]) -> float:
        try:
            self.prune(ratios)
            with torch.no_grad():
                return float(self.evaluate(self.loaded.model))
        finally:
            self.restore()

    def run(self, trials: int, progress: bool = True, enqueue_uniform: bool = True) -> dict:
        """Run until ``trials`` feasible trials are complete (resuming a study counts its
        finished ones); infeasible draws are pruned without evaluation. Returns a summary."""
        import optuna
        from tqdm.auto import tqdm

        s = self.settings
        choices = s.choices()
        done = len(self.completed())
        if done:
            log.info("study %s: %d trials already complete; resuming", self.storage, done)
        if enqueue_uniform and not self.study.trials:
            # the uniform profile first: the search starts from the baseline it must beat
            self.study.enqueue_trial({n: s.target for n in self.names})
        bar = tqdm(total=trials, initial=min(done, trials), desc="prune-search", unit="trial",
                   disable=not progress)
        attempts = 0
        while len(self.completed()) < trials:
            attempts += 1
            if attempts > 50 * trials:
                raise CaspError(f"after {attempts} draws fewer than {trials} were feasible; "
                                "widen --spread or lower --target")
            trial = self.study.ask()
            params = {n: trial.suggest_categorical(n, choices) for n in self.names}
            ratios = self.ratios(params)
            mean = mean_sparsity(ratios, self.shapes)
            trial.set_user_attr("mean_sparsity", mean)
            if mean < self.floor - 1e-12:
                self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
                continue
            start = time.perf_counter()
            value = self.run_trial(ratios)
            seconds = time.perf_counter() - start
            trial.set_user_attr("seconds", seconds)
            if not math.isfinite(value):
                value = float("inf")
            self.study.tell(trial, value)
            bar.update(1)
            bar.set_postfix_str(f"{value:.3f} (best {self.study.best_value:.3f})")
            log.info("trial %d: mean sparsity %.4f, objective %.4f, %.1f s", trial.number,
                     mean, value, seconds)
        bar.close()
        return self.summary()

    def summary(self) -> dict:
        completed = self.completed()
        if not completed:
            raise CaspError("the study has no completed trial yet")
        best = min(completed, key=lambda t: t.value)
        uniform = [t for t in completed
                   if all(v == self.settings.target for v in t.params.values())]
        ratios = self.ratios(best.params)
        return {
            "best_value": best.value, "best_trial": best.number,
            "best_params": best.params,
            "block_ratios": block_ratios_of(best.params, len(self.blocks)),
            "ratios": ratios, "mean_sparsity": mean_sparsity(ratios, self.shapes),
            "uniform_value": uniform[0].value if uniform else None,
            "trials_completed": len(completed),
            "trials_infeasible": sum(t.state.name == "PRUNED" for t in self.study.trials),
            "trial_seconds": [round(t.user_attrs.get("seconds", 0.0), 2) for t in completed],
            "trials": [{"number": t.number, "value": t.value, "params": t.params,
                        "mean_sparsity": round(t.user_attrs.get("mean_sparsity", 0), 6),
                        "seconds": round(t.user_attrs.get("seconds", 0.0), 2)}
                       for t in completed],
        }


class RankRecorder(PrunePass):
    """The fast mode's statistics: prunes uniformly at ``ratio`` (masked) and keeps each
    linear's row ranks of the score as seen on the way."""

    name = "prune-statistics"

    def __init__(self, score: str, ratio: float):
        super().__init__(score, ratio=ratio, store="masked")
        self.ranks: dict[str, torch.Tensor] = {}

    def _prune(self, ctx, name: str, gram) -> None:
        weight = ctx.module(name).weight.data
        scores = weight_scores(weight, self.method, gram.gram.diagonal(), gram.tokens)
        self.ranks[ctx.full_name(name)] = row_ranks(scores).cpu()
        super()._prune(ctx, name, gram)


def uniform_sparsity(target: float, shapes: dict[str, tuple[int, int]]) -> float:
    """The realized mean sparsity of the uniform profile at ``target``."""
    return mean_sparsity({n: target for n in shapes}, shapes)


__all__ = ["PruneSearch", "SearchSettings", "MODES", "linear_type", "realized",
           "uniform_sparsity"]
