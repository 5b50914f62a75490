"""The experiment's design, shared by its steps (pipelines/hetero_distill.py) and its report
(pipelines/experiment_report.py): profiles, pools, arms, the learning-signal ingredients, and where each
step of one experiment writes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
POOL_SPEC = REPO / "data" / "pools" / "related-hidden.toml"
ORIGINAL_SPEC = REPO / "data" / "pools" / "fashion-original.toml"
TEST_SET = "fashion-mnist:test"
HIDDEN_SOURCE = "fashion-hidden"
POOLS = {"related-hidden": None, "no-fashion": f"source <> '{HIDDEN_SOURCE}'"}  # pool -> filter on the scores
ARMS = ("original", "uniform", "related", "related+signal")


@dataclass(frozen=True)
class Profile:
    name: str
    pool_scale: float  # fraction of every source of the pool spec
    original_scale: float  # fraction of the teacher's training images used by the `original` arm
    teacher_epochs: int
    teacher_limit: int | None
    budget: int  # images per selection
    student_width: float
    steps: int
    batch_size: int
    eval_every: int
    eval_limit: int  # test images per curve point (the final accuracy uses all 10,000)
    seeds: tuple[int, ...]
    ablation_seed: int | None  # None: no ablation


PROFILES = {
    "quick": Profile("quick", pool_scale=0.05, original_scale=0.1, teacher_epochs=2, teacher_limit=6000, budget=2000,
                     student_width=0.5, steps=150, batch_size=64, eval_every=25, eval_limit=1000, seeds=(1,),
                     ablation_seed=None),
    "default": Profile("default", pool_scale=1.0, original_scale=1.0, teacher_epochs=5, teacher_limit=None,
                       budget=20000, student_width=0.5, steps=600, batch_size=128, eval_every=50, eval_limit=1000,
                       seeds=(1, 2, 3), ablation_seed=0),
}


@dataclass(frozen=True)
class Recipe:
    """A learning signal: what `train distill` adds to KD on the stored logits. Numbers are kept as written,
    so the command lines (and the report listing them) read as they were typed."""

    online_teacher: bool = False  # the teacher labels every augmented view
    mixup: float | None = None
    hard_weight: float | None = None
    feature_weight: float | None = None
    temperature: float | None = None

    def options(self, teacher: Path | str) -> list[str]:
        """Options of `train distill`, with ``teacher`` the teacher file."""
        argv = ["--teacher", str(teacher)] if self.online_teacher else []
        for name in ("mixup", "hard_weight", "feature_weight", "temperature"):
            if (value := getattr(self, name)) is not None:
                argv += ["--" + name.replace("_", "-"), str(value)]
        return argv


# The learning-signal ingredients, each tried alone on top of `related` (the ablation).
INGREDIENTS = {
    "online teacher": Recipe(online_teacher=True),
    "online teacher + mixup": Recipe(online_teacher=True, mixup=0.4),
    "hard-label term": Recipe(hard_weight=0.5),
    "feature matching": Recipe(feature_weight=1.0),
    "temperature 2": Recipe(temperature=2),
}
# The recipe of `related+signal`, fixed before the runs from the prototype (DESIGN.md: online views + mixup
# gave +1 point on no-fashion); the ablation reports what each ingredient does here, on a seed the final table
# does not use.
SIGNAL = INGREDIENTS["online teacher + mixup"]
STORED_LOGITS = Recipe()


@dataclass(frozen=True)
class Run:
    label: str  # arm or ablation line
    data: str  # which export it reads: original, uniform or related
    pool: str
    seed: int
    recipe: Recipe
    folder: Path


@dataclass(frozen=True)
class Design:
    """One experiment: its profile, where it writes (``out``), where the data is read (``root``)."""

    profile: Profile
    out: Path
    root: Path | None

    @property
    def teacher(self) -> Path:
        return self.out / "teacher.pt"

    def scored(self, name: str) -> Path:
        return self.out / "scored" / name

    def selection(self, arm: str, pool: str) -> Path:
        return self.out / "selections" / f"{arm}-{pool}.parquet"

    def shards(self, arm: str, pool: str) -> Path:
        return self.out / "shards" / f"{arm}-{pool}"

    def run_dir(self, arm: str, pool: str, seed: int) -> Path:
        return self.out / "runs" / arm.replace("+", "-") / pool / f"seed{seed}"

    def distill_runs(self) -> list[Run]:
        """Every student to train, in order: the arms over their pools and seeds, then the ablation."""
        p = self.profile
        runs = [Run("original", "original", "original", s, STORED_LOGITS, self.run_dir("original", "original", s))
                for s in p.seeds]
        for arm in ARMS[1:]:
            data = "uniform" if arm == "uniform" else "related"
            recipe = SIGNAL if arm == "related+signal" else STORED_LOGITS
            runs += [Run(arm, data, pool, s, recipe, self.run_dir(arm, pool, s)) for pool in POOLS for s in p.seeds]
        if p.ablation_seed is not None:
            for name, recipe in {"related (KD on stored logits)": STORED_LOGITS, **INGREDIENTS}.items():
                runs.append(Run(name, "related", "no-fashion", p.ablation_seed, recipe,
                                self.out / "ablation" / _slug(name)))
        return runs


def _slug(text: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in text.split("(")[0].replace("+", " plus ")).split())
