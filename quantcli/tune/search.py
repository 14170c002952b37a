"""`quantcli tune`: per-layer fixes, most sensitive layer first, until an accuracy goal is met.

1. Baseline: the recipe through the whole chain (`<out>/trials/00`), measured in ONNX Runtime.
2. Ranking: `quantcli report`'s local SQNR on the baseline, worst first, by module.
3. Trials, cheapest fix first for each layer in turn: another calibration method for that
   module, then keeping it in float (`quantization.overrides`). A fix that improves the goal's
   measure (goal.Goal.better) is kept and the next layer is tried on top of it; the search stops when the goal is met
   or the trials run out. Each trial reuses the baseline's captured artifact: prepare, calibrate,
   convert and export with the trial's recipe, measured on the real ONNX model in ORT.
4. The best trial's recipe goes to `<out>/recipe.yaml` and its artifacts are linked into `<out>`
   as they are (quantcli.tune.outputs): `quantcli run --recipe <out>/recipe.yaml -o <out>` reuses
   every stage. The outcome goes to `<out>/tune.json`; an unmet goal raises GoalError (exit 6)
   after it. Nothing in `<out>` that tune did not write is replaced without `--force`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from quantcli import pipeline
from quantcli import recipe as recipes
from quantcli.errors import GoalError, NumericsError, RecipeError
from quantcli.numerics.metrics import METRICS
from quantcli.stages.base import Progress, no_progress, recipe_of
from quantcli.tune import outputs
from quantcli.tune.goal import Goal, Judge
from quantcli.tune.outputs import OUTCOME, RECIPE

# Another calibration method to try for a layer, by the method it has.
OTHER_OBSERVER = {
    "auto": "percentile",
    "histogram": "percentile",
    "mse": "percentile",
    "percentile": "entropy",
    "entropy": "percentile",
    "minmax": "histogram",
    "moving_average_minmax": "histogram",
}


def recipe_text(recipe: recipes.Recipe, overrides: list[dict[str, Any]]) -> str:
    """The recipe with `overrides` appended to its quantization overrides (paths absolute, defaults left out)."""
    doc = recipe.model_dump(mode="json", exclude_defaults=True)
    quantization = doc.setdefault("quantization", {})
    quantization["overrides"] = quantization.get("overrides", []) + overrides
    return yaml.safe_dump(doc, sort_keys=False)


def write_recipe(recipe: recipes.Recipe, overrides: list[dict[str, Any]], path: Path) -> Path:
    outputs.write_atomic(path, recipe_text(recipe, overrides).encode())
    return path


def candidates(converted: Path, batches: int | None) -> list[str]:
    """Modules by the report's local SQNR, worst first (ops at the model's root cannot be named)."""
    from quantcli.report.layers import report

    doc = report(converted, batches=batches)
    layers = {d["name"]: d for d in doc["layers"]}
    modules: list[str] = []
    for name in doc["worst"]:
        module = layers[name]["module"]
        if module and module not in modules:
            modules.append(module)
    return modules


def trial(captured: Path, folder: Path, recipe_path: Path, force: bool) -> str:
    """prepare -> calibrate -> convert -> export from the baseline's capture; "ok" or "parity_failed"."""
    from quantcli import stages

    stages.prepare.run(captured, folder / "prepared", recipe_path=recipe_path, force=force)
    stages.calibrate.run(folder / "prepared", folder / "calibrated", recipe_path=recipe_path, force=force)
    stages.convert.run(folder / "calibrated", folder / "converted", force=force)
    try:
        stages.export.run(folder / "converted", folder / pipeline.ONNX_NAME, recipe_path=recipe_path, force=force)
    except NumericsError:
        return "parity_failed"
    return "ok"


class Search:
    """The trials so far, the fixes kept and the best trial; `layer(module)` tries one module's fixes."""

    def __init__(self, recipe: recipes.Recipe, judge: Judge, base: Path, graph: Any, force: bool, progress: Progress):
        self.recipe, self.judge, self.base, self.force, self.progress = recipe, judge, base, force, progress
        self.graph = graph  # the captured graph, whose module scopes the quantizer's policy matches
        baseline = {
            "trial": 0,
            "change": None,
            "overrides": [],
            "status": "ok",
            **judge.measure(base / pipeline.ONNX_NAME),
        }
        self.history: list[dict[str, Any]] = [baseline]
        self.kept: list[dict[str, Any]] = []
        self.best = baseline

    @property
    def trials(self) -> int:
        return len(self.history) - 1

    def layer(self, module: str, max_trials: int) -> None:
        """Another calibration method for `module`, then float, until one of them is better than the best.

        The fixes are appended overrides naming only what they change: the policy merges the overrides
        matching a module field by field, so the module keeps every other setting it had."""
        from quantcli.quantizers.policy import setting_of_module

        current = setting_of_module(self.recipe.quantization, self.graph, module)
        if current is None:  # already kept in float by the recipe
            return
        for fix in (
            {"names": [module], "observer": OTHER_OBSERVER[current.observer]},
            {"names": [module], "exclude": True},
        ):
            if self.trials >= max_trials:
                return
            record = self.attempt(fix, max_trials)
            if record["status"] == "ok" and self.judge.goal.better(record, self.best):
                self.kept, self.best = self.kept + [fix], record
                return

    def attempt(self, fix: dict[str, Any], max_trials: int) -> dict[str, Any]:
        number = self.trials + 1
        folder = self.base.parent / f"{number:02d}"
        path = write_recipe(self.recipe, self.kept + [fix], folder / RECIPE)
        status = trial(self.base / "captured", folder, path, self.force)
        best_model = self.base.parent / f"{self.best['trial']:02d}" / pipeline.ONNX_NAME
        if status == "ok" and _same_graph(folder / pipeline.ONNX_NAME, best_model):
            status = "no_effect"  # the override changed nothing (e.g. a module whose output another op quantizes)
        measured = self.judge.measure(folder / pipeline.ONNX_NAME)
        record = {
            "trial": number,
            "change": _describe(fix),
            "overrides": self.kept + [fix],
            "status": status,
            **measured,
        }
        self.history.append(record)
        self.progress(number, max_trials, {"sqnr_db": measured["sqnr_db"]})
        return record


def _checked(recipe_path: str | Path, max_drop: float | None, metric: str | None) -> recipes.Recipe:
    recipe = recipes.load(recipe_path)
    if recipe.training is not None:
        raise RecipeError(
            "tune searches post-training quantization; the recipe has a training: section",
            "remove it, or tune a recipe without it and train afterwards",
        )
    if recipe.quantization.weight_only:
        raise RecipeError(
            "tune searches static quantization (observers, float layers); this recipe is weight-only",
            "choose quantization.weights.method and exclude_names/overrides by hand: export's report measures each",
        )
    ev = recipe.evaluation
    own_targets = ev is not None and (ev.targets is not None or METRICS[ev.metric].next_token)  # perplexity's
    if max_drop is not None and (ev is None or not own_targets and metric is None):
        raise RecipeError(
            "--max-drop needs an evaluation: section with data and targets", "add one, or use --min-sqnr DB"
        )
    return recipe


def run(
    recipe_path: str | Path,
    out: str | Path,
    *,
    max_drop: float | None = None,
    min_sqnr: float | None = None,
    metric: str | None = None,
    max_trials: int = 10,
    batches: int | None = None,
    force: bool = False,
    progress: Progress = no_progress,
) -> dict[str, Any]:
    from quantcli import _torch, artifacts
    from quantcli.loading.factory import load_callable

    start = time.perf_counter()
    goal = Goal(max_drop, min_sqnr)
    recipe = _checked(recipe_path, max_drop, metric)
    score = load_callable(metric, "--metric") if metric else None
    out = Path(out)
    outputs.check_own_files(out, Path(recipe_path), force)
    base = out / "trials" / "00"
    pipeline.run(recipe_path, base, force=force)
    converted = artifacts.open_artifact(base / "converted", ("converted",), "tune")
    float_program = _torch.load_program(converted.file(artifacts.FLOAT_PROGRAM))
    judge = Judge(recipe_of(converted), float_program, goal, score, batches)  # its recipe: inputs resolved
    search = Search(recipe, judge, base, float_program.graph, force, progress)
    ranking = [] if goal.met(search.best) else candidates(base / "converted", batches)
    for module in ranking:
        if goal.met(search.best) or search.trials >= max_trials:
            break
        search.layer(module, max_trials)
    outcome = _finish(search, out, Path(recipe_path), ranking, force)
    outcome = outputs.write_own_files(
        out,
        recipe_text(search.recipe, search.best["overrides"]),
        {**outcome, "seconds": round(time.perf_counter() - start, 1)},
    )
    if not outcome["achieved"]:
        raise GoalError(
            f"goal {_goal_text(goal)} not met in {search.trials} trial(s): best "
            f"{_measure_text(search.best)} (trial {search.best['trial']}); model, recipe and {OUTCOME} "
            f"written to {out}",
            "raise --max-trials, or loosen the goal",
        )
    return outcome


def _finish(search: Search, out: Path, recipe_path: Path, ranking: list[str], force: bool) -> dict[str, Any]:
    """Link the best trial's artifacts into `<out>`; the outcome document."""
    best, judge = search.best, search.judge
    trial_folder = search.base.parent / f"{best['trial']:02d}"
    outputs.check_own_files(out, recipe_path, force)  # still tune's since the start
    outputs.adopt(search.base, trial_folder, out, force)
    model, final = out / pipeline.ONNX_NAME, out / RECIPE
    trial_model = trial_folder / pipeline.ONNX_NAME
    return {
        "goal": judge.goal.to_json(),
        "achieved": judge.goal.met(best),
        "metric": judge.metric_name,
        "fp32_torch": judge.fp32_torch,
        "data": {"section": judge.section, "batches": judge.batches},
        "baseline": search.history[0],
        "best": best,
        "trials": search.history[1:],
        "ranking": ranking,
        "layers_changed": sorted({n for o in best["overrides"] for n in o["names"]}),
        "model": str(model),
        "recipe": str(final),
        "reproduces_best_trial": _same_graph(model, trial_model),
    }


def _describe(fix: dict[str, Any]) -> str:
    what = "exclude (float)" if fix.get("exclude") else f"observer {fix['observer']}"
    return f"{fix['names'][0]}: {what}"


def _goal_text(goal: Goal) -> str:
    return f"drop <= {goal.max_drop}" if goal.max_drop is not None else f"output SQNR >= {goal.min_sqnr_db} dB"


def _measure_text(measured: dict[str, Any]) -> str:
    drop = f"drop {measured['drop']}, " if "drop" in measured else ""
    return f"{drop}output SQNR {measured['sqnr_db']} dB"


def _same_graph(a: Path, b: Path) -> bool:
    """Whether two ONNX files hold the same graph (their metadata, which names the chain, aside)."""
    import onnx

    from quantcli.artifacts import data_path, sha256_file

    first, second = onnx.load(str(a), load_external_data=False), onnx.load(str(b), load_external_data=False)
    del first.metadata_props[:]
    del second.metadata_props[:]
    data = [sha256_file(data_path(p)) if data_path(p).exists() else None for p in (a, b)]  # external tensors
    return first.SerializeToString() == second.SerializeToString() and data[0] == data[1]
