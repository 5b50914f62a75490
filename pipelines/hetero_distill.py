"""The experiment behind the project: distil a Fashion-MNIST teacher from heterogeneous unlabeled pools.

    python -m pipelines.hetero_distill --profile default   # one teacher, one student per arm: ~30 min on 2 cores
    python -m pipelines.hetero_distill --profile quick     # about 3 min
    python -m pipelines.hetero_distill --profile full      # 2 teachers x 3 students per arm, the ablation: hours
    python -m pipelines.hetero_distill --task digits       # the same for an MNIST-digit teacher (design.TASKS)

1. A `resnet8` teacher learns one half of Fashion-MNIST's training split (the "original data"); `full` trains
   two, from different seeds, and repeats steps 2-4 for each.
2. It scores the `related-hidden` pool (the other half, labels hidden, among digits, glyphs, emoji, icons,
   photo patches and noise) and its own training images.
3. Selections per pool: `uniform`, and `related` (balanced over the teacher's predicted classes, filled by
   relatedness, class weights used as sampling probabilities). `no-fashion` is the same scored pool without
   its Fashion-MNIST source (`--where "source <> 'fashion-hidden'"`), identical to data/pools/no-fashion.toml
   and scored once.
4. The same student, steps and batch size for every arm: `original` (the teacher's own images, no labels),
   `uniform` and `related` with plain KD on stored logits, `related+signal` with the better learning signal.
   The ablation (`full`) trains every candidate recipe on `related` / `no-fashion` with a tuning seed, for half
   the arms' steps (enough to rank them), and chooses the recipe of `related+signal` by KL(teacher || student)
   on held-out shard rows (no test label); the other profiles use `CHOSEN` (design.py). Recipes on refined
   images distil on a `curate refine` copy of the selection's shards and are scored on the unrefined folder's
   held-out rows, like the others.
5. Every student is evaluated on Fashion-MNIST's test split; `results.json`, `report.md` and plots follow.

`--task digits` asks whether the method carries over to another teacher: a digit teacher learns 4,000 of the
5,000 MNIST digits, and its students come from the same pool without its MNIST source (`no-mnist`), where
the task is down to scikit-learn's 8x8 digits and a few rendered glyphs; the recipe is the one chosen for
Fashion-MNIST, untouched.

Every step is one `curate`/`train` command (listed in the report) run with a completion marker, so running
the same command again after an interruption continues (pipelines/steps.py).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

from curate.errors import UserError
from curate.query.scored import ScoredPool
from pipelines.design import (
    CANDIDATES,
    CHOSEN,
    CHOSEN_BY,
    HELD_OUT_FILE,
    POOL_SPEC,
    PROFILES,
    RECIPE_CRITERION,
    TASKS,
    TUNING_SEEDS,
    Design,
    Recipe,
    Run,
    from_repo,
)
from pipelines.experiment_report import ablation_scores, write_experiment_report
from pipelines.steps import Lanes, Step, StepRunner, console


class Experiment:
    """The experiment's steps for one design, in order; each is one `curate`/`train` command."""

    def __init__(self, design: Design, lanes: Lanes) -> None:
        self.design = design
        self.runner = StepRunner(design.out)
        self.lanes = lanes  # students of one stage train this many at once

    def root_options(self, flag: str = "--root") -> list[str]:
        return [flag, str(self.design.root)] if self.design.root else []

    # -- stages, per teacher ---------------------------------------------------------------------------------

    def train_teacher(self, t: int) -> None:
        d, p = self.design, self.design.profile
        argv = ["train", "teacher", "--dataset", d.task.original, "--test-dataset", d.task.test, "--arch", "resnet8",
                "--epochs", str(p.teacher_epochs or d.task.teacher_epochs), "--flip" if d.task.flip else "--no-flip",
                "--seed", str(t), "--out", str(d.teacher(t)), *self.root_options()]
        if p.teacher_limit:
            argv += ["--limit", str(p.teacher_limit)]
        self.runner.run(Step(f"teacher{t}", "train teacher", argv, output=d.teacher(t)))

    def score(self, t: int) -> None:
        d = self.design
        for name, spec, scale in (("pool", POOL_SPEC, d.profile.pool_scale),
                                  ("original", d.task.original, d.profile.original_scale)):
            argv = ["curate", "score", "--teacher", str(d.teacher(t)), "--pool", str(spec), "-o", f"scale={scale}",
                    "--out", str(d.scored(t, name)), *self.root_options()]
            self.runner.run(Step(f"teacher{t}-score-{name}", "score", argv, writes=d.scored(t, name)))

    def select_and_export(self, t: int) -> None:
        d = self.design
        original_rows = ScoredPool.open(d.scored(t, "original")).rows
        budget = str(d.profile.budget or original_rows)
        plans = [("original", "original", ["--strategy", "uniform", "--budget", str(original_rows)], "original")]
        for pool, where in d.task.pools.items():
            filters = ["--where", where] if where else []
            plans.append(("uniform", pool, ["--strategy", "uniform", "--budget", budget, *filters], "pool"))
            plans.append(("related", pool, ["--strategy", "balanced", "--budget", budget, "--weights", "class",
                                            *filters], "pool"))
        for arm, pool, options, scored in plans:
            selection, shards = d.selection(t, arm, pool), d.shards(t, arm, pool)
            self.runner.run(Step(f"teacher{t}-select-{arm}-{pool}", "select", [
                "curate", "select", "--scored", str(d.scored(t, scored)), *options, "--seed", "0", "--out",
                str(selection)], output=selection))
            self.runner.run(Step(f"teacher{t}-export-{arm}-{pool}", "export", [
                "curate", "export", "--scored", str(d.scored(t, scored)), "--selection", str(selection), "--embedding",
                "--out", str(shards), *self.root_options()], output=shards))

    def report_selections(self, t: int) -> None:
        d = self.design
        for pool in d.task.pools:
            self.runner.run(Step(f"teacher{t}-report-{pool}", "report", [
                "curate", "report", "--scored", str(d.scored(t, "pool")), "--selection",
                str(d.selection(t, "related", pool)), "--out", str(d.base(t) / "selection-report" / pool)],
                writes=d.base(t) / "selection-report" / pool))

    # -- students --------------------------------------------------------------------------------------------

    def choose_recipe(self) -> Recipe:
        """The recipe of `related+signal`: with the ablation, the candidate whose students are closest to the
        teacher on held-out rows of their shards, mean over the tuning seeds (no test label); without, the one the
        `full` profile chose."""
        runs = self.design.ablation_runs()
        self.distill(runs)
        if runs:
            scores = ablation_scores(runs)
            chosen, how = min(scores, key=scores.__getitem__), "this experiment's ablation"
        else:
            scores, chosen, how = {}, CHOSEN, CHOSEN_BY
        choice = {"chosen": chosen, "criterion": RECIPE_CRITERION, "chosen_by": how, "scores": scores,
                  "options": CANDIDATES[chosen].options("teacher.pt"), "refined": CANDIDATES[chosen].refine}
        self.design.recipe_file.write_text(json.dumps(choice, indent=1))
        return CANDIDATES[chosen]

    def step_name(self, stage: str, run: Run) -> str:
        """``stage`` and the run's folder under the results, as one marker name."""
        return f"{stage}-{run.folder.relative_to(self.design.out).as_posix().replace('/', '-')}"

    def refine(self, runs: list[Run]) -> None:
        """The refined copy of every related selection that ``runs`` distil on."""
        d = self.design
        for t, pool in sorted({(run.teacher, run.pool) for run in runs if run.data == "refined"}):
            refined = d.shards(t, "refined", pool)
            self.runner.run(Step(f"teacher{t}-refine-{pool}", "refine", [
                "curate", "refine", "--shards", str(d.shards(t, "related", pool)), "--teacher", str(d.teacher(t)),
                "--out", str(refined)], output=refined))

    def score_on_unrefined_rows(self, runs: list[Run]) -> None:
        """Held-out figures of the runs on refined shards, on the rows their unrefined folder holds out."""
        d = self.design
        for run in (run for run in runs if run.data == "refined"):
            figures = run.folder / HELD_OUT_FILE
            self.runner.run(Step(self.step_name("held-out", run), "held-out", [
                "train", "eval", "--model", str(run.folder / "student.pt"), "--shards",
                str(d.shards(run.teacher, "related", run.pool)), "--holdout", str(d.profile.holdout), "--json",
                str(figures)], output=figures))

    def distill(self, runs: list[Run]) -> None:
        d, p = self.design, self.design.profile
        self.refine(runs)
        steps = []
        # Longest first: an online-teacher student takes about three times as long as one on stored logits, so
        # started last it would run on alone while the other lanes idle.
        for run in sorted(runs, key=lambda run: not run.recipe.online_teacher):
            # each predicted class equally often
            options = ["--weighting", "sample"] if run.data in ("related", "refined") else []
            options += run.recipe.options(d.teacher(run.teacher))
            argv = ["train", "distill", "--shards", str(d.shards(run.teacher, run.data, run.pool)),
                    "--out", str(run.folder), "--student", "resnet8", "--width", str(p.student_width),
                    "--steps", str(run.steps), "--batch-size", str(p.batch_size), "--holdout", str(p.holdout),
                    "--eval", d.task.test, "--eval-every", str(p.eval_every), "--eval-limit", str(p.eval_limit),
                    "--log-every", str(p.eval_every), "--seed", str(run.seed), *options,
                    *self.root_options("--eval-root")]
            steps.append(Step(self.step_name("distill", run), "distill", argv, writes=run.folder,
                              resume_with=["--resume"],
                              resumable=lambda folder=run.folder: any(folder.glob("ckpt-*.pt"))))
        self.runner.run_at_once(steps, self.lanes)
        self.score_on_unrefined_rows(runs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--task", choices=sorted(TASKS), default="fashion",
                        help="the teacher's task: fashion (Fashion-MNIST, the main experiment) or digits (MNIST "
                             "digits from a pool without them: does the method carry over to another teacher?)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/<profile>, results/<task>-<profile> for other tasks)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, metavar="SEED",
                        help="student seeds per teacher and arm, for mean ± std over them (default: the profile's; "
                             f"{' and '.join(map(str, TUNING_SEEDS))} are the ablation's). Students already trained "
                             "are kept: adding seeds to a finished run trains only the new ones")
    parser.add_argument("--root", type=Path, default=None, help="data folder (default $CURATE_DATA or ./data)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="students trained at once, each in its own process with an equal share of the cores "
                             "(default: one per core, at most 4, on a CPU; 1 on a GPU)")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error("--jobs must be at least 1")
    profile, task = PROFILES[args.profile], TASKS[args.task]
    if args.seeds is not None:
        if any(seed < 0 for seed in args.seeds) or len(set(args.seeds)) < len(args.seeds):
            parser.error("--seeds takes distinct seeds of 0 or more")
        if set(args.seeds) & set(TUNING_SEEDS):
            parser.error(f"--seeds {' and '.join(map(str, TUNING_SEEDS))} are the ablation's tuning seeds, which "
                         "the final table does not use: pick others")
        profile = replace(profile, seeds=tuple(args.seeds))
    out = args.out or Path("results") / (profile.name if task.name == "fashion" else f"{task.name}-{profile.name}")
    design = Design(task, profile, out, args.root)
    experiment = Experiment(design, Lanes.for_this_machine(args.jobs))
    (design.out / "profile.json").write_text(from_repo(json.dumps({**asdict(profile), "task": asdict(task)}, indent=1)))
    try:
        for t in profile.teachers:
            experiment.train_teacher(t)
            experiment.score(t)
            experiment.select_and_export(t)
        experiment.report_selections(profile.teachers[0])
        signal = experiment.choose_recipe()
        experiment.distill(design.arm_runs(signal))
        report = write_experiment_report(design, experiment.runner, signal)
    except UserError as err:
        console.print(f"[red]error:[/] {' '.join(str(err).split())}")
        raise SystemExit(2) from None
    console.print(f"wrote {report}")


if __name__ == "__main__":
    main()
