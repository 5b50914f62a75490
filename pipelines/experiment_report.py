"""The experiment's results: `results.json`, `report.md` and its plots, from the finished runs.

Each student is evaluated once on the whole test split (accuracy, and agreement with the teacher's
predictions there) and the figures are cached next to it (`final_eval.json`; the teacher's in
`teacher_eval.json`), so writing the report again costs seconds. Curves come from the runs' own
`metrics.jsonl` (evaluations on a seeded test subset).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from curate.device import pick_device
from curate.pools import PoolDataset, open_pool
from curate.query.export import reopen_pool
from curate.query.scored import ScoredPool, sql_string
from curate.spec import InputSpec
from curate.teachers import load_teacher
from pipelines.design import (
    ARMS,
    HELD_OUT_FILE,
    RECIPE_CRITERION,
    Design,
    Recipe,
    Run,
    from_repo,
)
from pipelines.steps import StepRunner
from train.evaluate import Evaluator

STEPS_TO_FRACTION = 0.9  # steps_to_90: the first evaluation reaching 90% of `original`'s final accuracy


def is_fresh(path: Path, source: Path) -> bool:
    """``path`` exists and was written after ``source`` last changed."""
    return path.exists() and path.stat().st_mtime >= source.stat().st_mtime


def cached_json(path: Path, source: Path, compute: Callable[[], Any]) -> Any:
    """``compute()``, kept in ``path`` and reused while ``path`` is newer than ``source``."""
    if is_fresh(path, source):
        return json.loads(path.read_text())
    value = compute()
    path.write_text(json.dumps(value))
    return value


class TestSet:
    """Figures on the whole test split, computed once per model file and cached next to it; the split and each
    teacher's predictions are loaded only when a figure is missing, so rewriting the report costs seconds."""

    def __init__(self, design: Design) -> None:
        self.design = design
        self.evaluators: dict[int, Evaluator] = {}

    def evaluator(self, t: int) -> Evaluator:
        if t not in self.evaluators:
            device = pick_device("auto")
            teacher = load_teacher(self.design.teacher(t), device=device)
            self.evaluators[t] = Evaluator(self.design.task.test, self.design.root, teacher.spec,
                                           teacher.num_classes, teacher, device, limit=self.design.profile.test_limit)
        return self.evaluators[t]

    def teacher_accuracy(self, t: int) -> float:
        teacher = self.design.teacher(t)
        return cached_json(teacher.with_name("teacher_eval.json"), teacher,
                           lambda: {"accuracy": self.evaluator(t).teacher_accuracy})["accuracy"]

    def final(self, run: Run) -> dict[str, Any]:
        student = run.folder / "student.pt"

        def evaluate() -> dict[str, Any]:
            evaluator = self.evaluator(run.teacher)
            return evaluator(load_teacher(student, device=evaluator.device).model, per_class=True)

        return cached_json(run.folder / "final_eval.json", student, evaluate)


def curve(run: Run) -> list[tuple[int, float]]:
    lines = (run.folder / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["eval_accuracy"]) for r in map(json.loads, lines) if "eval_accuracy" in r]


def last_metrics(folder: Path) -> dict[str, Any]:
    """The last line of a finished run's metrics.jsonl: its final evaluation."""
    return json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])


def held_out(folder: Path) -> dict[str, float]:
    """A finished run's held-out figures (holdout_kl, holdout_agreement, ...): on the unrefined rows for a run
    on a refined folder (HELD_OUT_FILE, by `train eval --shards`), else the training log's last."""
    if (folder / HELD_OUT_FILE).exists():
        return json.loads((folder / HELD_OUT_FILE).read_text())
    return {key[len("eval_"):]: value for key, value in last_metrics(folder).items() if key.startswith("eval_holdout")}


def ablation_scores(runs: list[Run]) -> dict[str, float]:
    """Each candidate's recipe criterion (held-out KL), the mean over its runs: one per tuning seed."""
    per_seed: dict[str, list[float]] = {}
    for run in runs:
        per_seed.setdefault(run.label, []).append(float(held_out(run.folder)[RECIPE_CRITERION]))
    return {label: float(np.mean(values)) for label, values in per_seed.items()}


def summarize(runs: list[Run], test: TestSet) -> dict[str, Any]:
    """Mean and spread over every teacher and student seed of one arm on one pool, with the mean curve."""
    finals = [test.final(r) for r in runs]
    curves = [curve(r) for r in runs]
    steps = [s for s, _ in curves[0]]
    mean_curve = [[step, float(np.mean([dict(c)[step] for c in curves]))] for step in steps]
    accuracy = [f["accuracy"] for f in finals]
    held_out_kl = [held_out(r.folder)["holdout_kl"] for r in runs]
    return {"accuracy": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy, ddof=1)) if len(runs) > 1
            else 0.0, "agreement": float(np.mean([f["agreement"] for f in finals])),
            "holdout_kl": float(np.mean(held_out_kl)),
            "per_class_accuracy": np.mean([f["per_class_accuracy"] for f in finals], axis=0).tolist(),
            "runs": [{"teacher": r.teacher, "seed": r.seed, "accuracy": a} for r, a in zip(runs, accuracy)],
            "curve": mean_curve}


def steps_to(curve_points: list[list[float]], target: float) -> int | None:
    return next((int(step) for step, accuracy in curve_points if accuracy >= target), None)


def selection_quality(design: Design, t: int) -> dict[str, dict[str, Any]]:
    """Per pool and selection of teacher ``t``: rows, predicted classes, the smallest class's share of the rows
    and, where the pool hides the task's own images, how much of the selection they are (precision) and how
    much of them it found (recall)."""
    task = design.task
    selections = [design.selection(t, arm, pool) for pool in task.pools for arm in ("uniform", "related")]
    con = ScoredPool.open(design.scored(t, "pool")).connect(other_files=tuple(selections))
    hidden_source = sql_string(task.hidden_source or "")  # no source has an empty name: 0 hidden rows without one
    hidden = con.execute(f"SELECT count(*) FROM scores WHERE source = {hidden_source}").fetchone()[0]
    quality: dict[str, dict[str, Any]] = {}
    for pool in task.pools:
        for arm in ("uniform", "related"):
            path = sql_string(str(design.selection(t, arm, pool)))
            rows, found, classes, smallest = con.execute(f"""
                SELECT sum(n), sum(found), count(*), min(n) FROM (
                    SELECT count(*) AS n, count(*) FILTER (WHERE s.source = {hidden_source}) AS found
                    FROM read_parquet({path}) sel JOIN scores s USING (uid) GROUP BY s.pred)""").fetchone()
            rows, found = int(rows or 0), int(found or 0)
            entry = {"rows": rows, "predicted_classes": classes, "smallest_class_share": (smallest or 0) / rows
                     if rows else 0.0}
            if task.hidden_source:
                entry |= {"hidden_rows": found, "precision": found / rows if rows else 0.0,
                          "recall": found / hidden if hidden else None}
            quality.setdefault(pool, {})[arm] = entry
    return quality


def plot_curves(results: dict[str, Any], pools: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(pools), figsize=(6 * len(pools), 4.2), sharey=True)
    original = results["arms"]["original"]["original"]
    for ax, pool in zip(np.atleast_1d(axes), pools):
        steps, accuracy = zip(*original["curve"])
        ax.plot(steps, accuracy, "k--", label="original (teacher's own images)")
        for arm, style in (("uniform", "C0o-"), ("related", "C1s-"), ("related+signal", "C2^-")):
            entry = results["arms"][arm][pool]
            steps, accuracy = zip(*entry["curve"])
            ax.plot(steps, accuracy, style, markersize=3, label=f"{arm} ({entry['accuracy']:.1%})")
        ax.axhline(STEPS_TO_FRACTION * original["accuracy"], color="grey", lw=0.8, ls=":")
        ax.set_title(f"pool: {pool}")
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    np.atleast_1d(axes)[0].set_ylabel("test accuracy (subset, mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sample_grid(design: Design, t: int, path: Path, per_source: int = 8) -> None:
    """A row of pool images per source, as teacher ``t`` sees them, with their relatedness."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = ScoredPool.open(design.scored(t, "pool"))
    pool = reopen_pool(scored, design.root)
    geometry = InputSpec.from_meta(scored.teacher_meta).geometry()
    con = scored.connect()
    rng = np.random.default_rng(0)
    names, rows = [s.name for s in pool.sources], []
    for source, start in zip(pool.sources, pool.starts):
        positions = np.sort(start + rng.choice(len(source), min(per_source, len(source)), replace=False))
        samples = [PoolDataset(pool, geometry)[int(i)] for i in positions]
        uids = [sample.uid for sample in samples]
        related = dict(con.execute("SELECT uid, relatedness FROM scores WHERE list_contains(?, "
                                   "uid)", [uids]).fetchall())
        rows.append([(sample.image, related.get(sample.uid)) for sample in samples if sample.image is not None])
    fig, axes = plt.subplots(len(rows), per_source, figsize=(per_source * 0.9, len(rows) * 1.05))
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_frame_on(False)
    for r, (name, row) in enumerate(zip(names, rows)):
        for c, (image, relatedness) in enumerate(sorted(row, key=lambda x: -(x[1] if x[1] is not None else -1e9))):
            axes[r, c].imshow(image.permute(1, 2, 0).squeeze().numpy(), cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_title("?" if relatedness is None else f"{relatedness:.1f}", fontsize=6, pad=1)
        axes[r, 0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.suptitle("pool samples per source (teacher's input) and their relatedness", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _spread(values: list[float]) -> str:
    return f" ± {100 * np.std(values, ddof=1):.1f}" if len(values) > 1 else ""


def per_class_table(results: dict[str, Any], pool: str) -> list[str]:
    """Test accuracy per class of the students of ``pool``, the one without the task's images (with `original`
    for reference): which classes such a pool cannot teach."""
    columns = [("original", "original")] + [(arm, pool) for arm in ARMS[1:]]
    lines = [f"## Per class, pool `{pool}`", "",
             "| class | " + " | ".join(f"{arm}" + ("" if pool == "original" else f" ({pool})")
                                      for arm, pool in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    for c, name in enumerate(results["class_names"]):
        cells = [_pct(results["arms"][arm][pool]["per_class_accuracy"][c]) for arm, pool in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_experiment_report(design: Design, runner: StepRunner, signal: Recipe) -> Path:
    out, first = design.out, design.profile.teachers[0]
    test = TestSet(design)
    arm_runs = design.arm_runs(signal)
    teachers = [test.teacher_accuracy(t) for t in design.profile.teachers]
    results: dict[str, Any] = {"profile": design.profile.name, "teacher_accuracy": float(np.mean(teachers)),
                               "teacher_accuracies": teachers, "class_names": class_names(design), "arms": {},
                               "recipe": json.loads(design.recipe_file.read_text()), "ablation": {}}
    for arm in ARMS:
        for pool in ["original"] if arm == "original" else list(design.task.pools):
            group = [r for r in arm_runs if r.label == arm and r.pool == pool]
            results["arms"].setdefault(arm, {})[pool] = summarize(group, test)
    target = STEPS_TO_FRACTION * results["arms"]["original"]["original"]["accuracy"]
    for arm in results["arms"].values():
        for entry in arm.values():
            entry["steps_to_90"] = steps_to(entry["curve"], target)
    for run in design.ablation_runs():
        final = test.final(run)
        entry = results["ablation"].setdefault(run.label, {"pool": run.pool, "options": run.recipe.shown("teacher.pt"),
                                                            "seeds": []})
        entry["seeds"].append({"seed": run.seed, "accuracy": final["accuracy"], "agreement": final["agreement"],
                               **held_out(run.folder)})
    for entry in results["ablation"].values():  # every figure's mean over the tuning seeds
        figures = [key for key in entry["seeds"][0] if key != "seed"]
        entry.update({key: float(np.mean([s[key] for s in entry["seeds"]])) for key in figures})
    results["selection"] = selection_quality(design, first)
    results["stage_seconds"] = {k: round(v, 1) for k, v in runner.timings.items()}
    results["commands"] = [from_repo(command) for command in runner.commands]
    (out / "results.json").write_text(json.dumps(results, indent=1))

    plot_curves(results, list(design.task.pools), out / "curves.png")
    grid = out / "samples_by_source.png"
    if not is_fresh(grid, design.scored(first, "pool") / "_manifest.json"):
        plot_sample_grid(design, first, grid)  # decodes photos: drawn again only when the pool was scored again
    (out / "report.md").write_text(render_markdown(results, design))
    return out / "report.md"


def class_names(design: Design) -> list[str]:
    return ScoredPool.open(design.scored(design.profile.teachers[0], "pool")).class_names


def render_markdown(results: dict[str, Any], design: Design) -> str:
    p = design.profile
    task = design.task
    teacher_data = f"at most {p.teacher_limit:,} images of {task.original_title}" if p.teacher_limit \
        else task.original_title
    original = results["arms"]["original"]["original"]
    teachers = results["teacher_accuracies"]
    split = len(open_pool(task.test, design.root))
    test_images = f"a seeded {p.test_limit:,}-image subset" if p.test_limit and p.test_limit < split else "all"
    curve_images = f"a seeded {p.eval_limit:,}-image subset" if p.eval_limit < split else "all of it"
    students = f"{len(p.teachers)} teacher{'s' if len(p.teachers) > 1 else ''} x {len(p.seeds)} student " \
               f"seed{'s' if len(p.seeds) > 1 else ''}"
    lines = [f"# Distilling a teacher of {task.title} from heterogeneous pools (profile `{p.name}`)", "",
             f"Teacher: resnet8 on {teacher_data} ({len(teachers)} seed"
             f"{'s' if len(teachers) > 1 else ''}), **{_pct(results['teacher_accuracy'])}**{_spread(teachers)} "
             f"test accuracy. Student: resnet8 at width {p.student_width}, {p.steps:,} steps of {p.batch_size} "
             f"for every arm, {100 * p.holdout:.0f}% of its shard rows held out. Test: {test_images} of "
             f"the {split:,} images of `{task.test}` (curves: {curve_images}). Figures: mean ± "
             f"standard deviation over {students}.", "",
             "| arm | pool | test accuracy | agreement with teacher | held-out KL | steps to 90% of original |",
             "|---|---|---:|---:|---:|---:|"]
    for arm in ARMS:
        for pool, entry in results["arms"][arm].items():
            spread = _spread([r["accuracy"] for r in entry["runs"]])
            lines.append(f"| {arm} | {pool} | {_pct(entry['accuracy'])}{spread} | {_pct(entry['agreement'])} | "
                         f"{entry['holdout_kl']:.3f} | "
                         f"{entry['steps_to_90'] if entry['steps_to_90'] is not None else 'never'} |")
    lines += ["", f"`steps to 90% of original`: first evaluated step of the mean curve whose accuracy reaches "
              f"{_pct(STEPS_TO_FRACTION * original['accuracy'])}. `held-out KL`: KL(teacher || student) on "
              "the held-out rows of the arm's own shards (no label; lower is closer).", "",
              "![accuracy vs steps](curves.png)", ""]
    recipe = results["recipe"]
    lines += ["`related`: balanced over the teacher's predicted classes, each class's quota filled by relatedness, "
              "class weights as sampling probabilities, KD (T=4) on stored logits. `related+signal`: the same "
              f"shards{' refined by `curate refine`' if recipe.get('refined') else ''} with "
              f"`{' '.join(recipe['options'])}` ({recipe['chosen']}).", ""]
    lines += per_class_table(results, task.unrelated)
    lines += ["## How the recipe of `related+signal` was chosen", ""]
    if results["ablation"]:
        seeds = " and ".join(str(s["seed"]) for s in next(iter(results["ablation"].values()))["seeds"])
        lines += [f"Every candidate recipe trained on `related` / `{task.unrelated}` (teacher seed {p.teachers[0]}, "
                  f"student seeds {seeds}, not among the final table's; {p.ablation_steps or p.steps:,} steps); the "
                  "chosen one is closest to the teacher on the held-out shard rows: the lowest KL(teacher || student) "
                  "there, mean over the seeds. Agreement is shown too; test accuracy is shown, not used. Figures are "
                  "means over the seeds.", "",
                  "| recipe | options | held-out KL (criterion) | per seed | held-out agreement | test accuracy | "
                  "vs KD on stored logits |", "|---|---|---:|---:|---:|---:|---:|"]
        base = results["ablation"].get("related (KD on stored logits)", {}).get("accuracy")
        for name, entry in sorted(results["ablation"].items(), key=lambda item: item[1]["holdout_kl"]):
            delta = "" if base is None else f"{100 * (entry['accuracy'] - base):+.1f}"
            mark = "**" if name == recipe["chosen"] else ""
            per_seed = " / ".join(f"{s[RECIPE_CRITERION]:.4f}" for s in entry["seeds"])
            lines.append(f"| {mark}{name}{mark} | `{' '.join(entry['options']) or '(none)'}` | "
                         f"{entry['holdout_kl']:.4f} | {per_seed} | "
                         f"{_pct(entry['holdout_agreement'])} | {_pct(entry['accuracy'])} | {delta} |")
        lines.append("")
    else:
        lines += [f"This profile runs no ablation: it uses `{recipe['chosen']}`, the recipe chosen by "
                  f"{recipe['chosen_by']} (closest to the teacher on held-out shard rows; no test label).", ""]
    hidden = task.hidden_source
    lines += ["## Selections", "", f"Teacher seed {p.teachers[0]}. `smallest class`: the share of the selection the "
              f"teacher assigns to its least predicted class ({_pct(1 / len(results['class_names']))} would be even)."
              + (f" Share of each selection taken from the pool's hidden {task.title} images (source `{hidden}`: "
                 f"precision) and share of them it took (recall); `{task.unrelated}` excludes that source by "
                 "construction." if hidden else ""), "",
              "| pool | selection | rows | predicted classes | smallest class |"
              + (f" hidden {task.title} rows | precision | recall |" if hidden else ""),
              "|---|---|---:|---:|---:|" + ("---:|---:|---:|" if hidden else "")]
    for pool, arms in results["selection"].items():
        for arm, q in arms.items():
            lines.append(f"| {pool} | {arm} | {q['rows']:,} | {q['predicted_classes']} | "
                         f"{_pct(q['smallest_class_share'])} |"
                         + (f" {q['hidden_rows']:,} | {_pct(q['precision'])} | {_pct(q['recall'])} |" if hidden
                            else ""))
    reports = [f"[{pool}](teacher{p.teachers[0]}/selection-report/{pool}/report.md)" for pool in task.pools]
    lines += ["", "Composition of the `related` selections per source and per predicted class: "
              + ", ".join(reports) + ".", "",
              "![pool samples per source](samples_by_source.png)", "",
              "## Wall time per stage", "", "| stage | seconds |", "|---|---:|"]
    lines += [f"| {stage} | {seconds:,.0f} |" for stage, seconds in results["stage_seconds"].items()]
    lines += [f"| total | {sum(results['stage_seconds'].values()):,.0f} |", "",
              "## Commands, in order (from the repository's root)", "", "```bash", *results["commands"], "```", ""]
    return "\n".join(lines)
