"""The study's trials (row x fold x seed [x label fraction]), the ``--set`` overrides of each, and the shared
pretraining runs.

The user's ``--set`` items apply to every row (``model.width=0.25``) or, prefixed with a row
name, to one row (``timesformer:model.tf_depth=4``). They are checked before any trial
starts, each problem one line:
- a key the study sets itself (``model.arch``, ``model.norm``, ``model.nonlocal_stages``,
  ``model.aggregator``: they define the rows; ``finetune.seed``, ``pretrain.seed``: from
  ``--seeds``; ``finetune.label_fraction``: from ``--label-fractions``) is refused: choose rows
  with ``--tables`` / ``--rows`` instead;
- a model key a selected row does not read (a baseline given CLMAN's ``model.width``, any
  row but TimeSformer given ``model.tf_*``; ``clman.models.build.ignored_fields``) is refused,
  with the scoped form to use instead;
- the pretrained rows share one SimCLR run per (fold, seed), so encoder and ``pretrain.*``
  keys cannot be scoped to one of them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from clman import config as C
from clman.study.folds import HOLDOUT
from clman.study.rows import Row, StudyError

SEED_KEYS = ("finetune.seed", "pretrain.seed")
FRACTION_KEY = "finetune.label_fraction"  # set per trial from --label-fractions (Trial.fraction)
# Fields that shape the encoder's weights (clman.models.build.ENCODER_FIELDS): a pretrained row
# must agree with the SimCLR run whose weights it loads.
ENCODER_KEYS = ("model.norm", "model.nonlocal_stages", "model.width", "model.gn_groups")


@dataclass(frozen=True)
class Trial:
    row: Row
    fold: int  # HOLDOUT (-1): the manifest's fixed train/test split
    seed: int
    fraction: float = 1.0  # finetune.label_fraction: the share of the training patients whose labels it sees

    @property
    def id(self) -> str:
        """A name for the trial's outputs: ``clman-f2-s0``, ``gn-holdout-s1``; ``clman-f2-s0-lf0.25`` below
        all labels (1 has no suffix: the ids, and so the resume, of a study without fractions are as before)."""
        fold = "holdout" if self.fold == HOLDOUT else f"f{self.fold}"
        return f"{self.row.name}-{fold}-s{self.seed}" + ("" if self.fraction == 1 else f"-lf{self.fraction:g}")


@dataclass(frozen=True)
class StudySets:
    """The user's ``--set`` items, checked: those for every row and those scoped to one row."""

    common: tuple[str, ...] = ()
    scoped: tuple[tuple[str, str], ...] = ()  # (row name, "key=value")

    def for_row(self, name: str) -> tuple[str, ...]:
        return tuple(item for row, item in self.scoped if row == name)


def trials(
    rows: Sequence[Row], folds: Iterable[int], seeds: int | Iterable[int], fractions: Sequence[float] = (1.0,)
) -> list[Trial]:
    """The grid, fold-major (all rows and fractions of a (fold, seed) together, so its pretraining is used
    at once)."""
    seed_list = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    if not seed_list:
        raise StudyError("--seeds must be >= 1")
    return [Trial(r, f, s, p) for f in folds for s in seed_list for p in fractions for r in rows]


def pretrain_cells(grid: Iterable[Trial]) -> list[tuple[int, int]]:
    """The (fold, seed) pairs that need a SimCLR run: those with a pretrained row, in grid order."""
    cells: list[tuple[int, int]] = []
    for t in grid:
        if t.row.pretrained and (t.fold, t.seed) not in cells:
            cells.append((t.fold, t.seed))
    return cells


def _key(item: str) -> str:
    if "=" not in item:
        raise StudyError(f"--set {item!r}: expected key=value or row:key=value, e.g. finetune.lr=1e-4")
    key = item.split("=", 1)[0].strip()
    section, _, name = key.partition(".")
    classes = {**C.SUB_CONFIGS, **C.JOB_CONFIGS}
    if section not in classes or not name or "." in name:
        raise StudyError(f"--set {item!r}: expected <section>.<field> with a section of {sorted(classes)}")
    fields = [f.name for f in dataclasses.fields(classes[section])]
    if name not in fields:
        raise StudyError(f"--set {item!r}: unknown key {name!r} in {section}; allowed: {fields}")
    return key


def _unread(row: Row, items: Sequence[str], model: Mapping | None) -> list[str]:
    """The ``model.*`` keys of ``items`` that ``row``'s arch leaves unused."""
    from clman.models.build import ignored_fields  # torch and the model zoo: only when checking

    tree = C.apply_overrides({"model": dict(model or {})}, [*items, *row.sets])
    try:
        cfg = C.build(C.ModelConfig, tree["model"], "model")
    except C.ConfigError as e:
        raise StudyError(f"row {row.name}: {e}") from None
    keys = {_key(i) for i in items}
    return [k for k in ignored_fields(cfg) if k in keys]


def parse_sets(items: Sequence[str], rows: Sequence[Row], model: Mapping | None = None) -> StudySets:
    """Check the user's ``--set`` items against the selected rows (see the module docstring).

    model: the preset's ``model`` section, if any (the values the items are applied on).
    """
    names = [r.name for r in rows]
    common: list[str] = []
    scoped: list[tuple[str, str]] = []
    for item in items:
        head = item.split("=", 1)[0]
        if ":" in head:
            name, item = item.split(":", 1)
            name = name.strip()
            if name not in names:
                raise StudyError(f"--set {name}:{item}: {name!r} is not a row of this study; rows: {', '.join(names)}")
        else:
            name = None
        key = _key(item)
        owners = [r.name for r in rows if key in r.keys]
        if owners or key in (*SEED_KEYS, FRACTION_KEY):
            why = (
                "from --seeds"
                if key in SEED_KEYS
                else "from --label-fractions"
                if key == FRACTION_KEY
                else f"it defines rows {', '.join(owners)}"
            )
            raise StudyError(f"--set {item}: the study sets {key} itself ({why}); choose rows with --tables / --rows")
        shared = key.startswith("pretrain.") or (
            key in ENCODER_KEYS and name is not None and dict(zip(names, rows))[name].pretrained
        )
        if name is not None and shared:
            raise StudyError(
                f"--set {name}:{item}: the pretrained rows share one SimCLR run per (fold, seed); "
                f"set {key} for every row (without the '{name}:' prefix)"
            )
        if name is None:
            common.append(item)
        else:
            scoped.append((name, item))
    sets = StudySets(tuple(common), tuple(scoped))
    for r in rows:
        given = [(f"{r.name}:{i}", i) for i in sets.for_row(r.name)] + [(i, i) for i in sets.common]
        for key in _unread(r, [i for _, i in given], model):
            shown, item = next((s, i) for s, i in given if _key(i) == key)
            # Encoder keys cannot be scoped to a pretrained row (shared SimCLR run).
            readers = [
                x.name for x in rows if not _unread(x, [item], model) and not (x.pretrained and key in ENCODER_KEYS)
            ]
            hint = (
                f"scope it to the rows that read it (e.g. --set {readers[0]}:{item}) or put it in the --config preset"
                if readers
                else "put it in the --config preset instead (rows that ignore it warn)"
            )
            raise StudyError(f"--set {shown}: row {r.name} (model.arch={r.arch}) does not read {key}; {hint}")
    return sets


def _derived(row: Row, chosen: Sequence[str], tree: Mapping | None) -> list[str]:
    """TimeSformer's learned embeddings sized to the study's frames (docs/models.md: keep them equal)."""
    if row.arch != "timesformer":
        return []
    tree = tree or {}
    model, data = dict(tree.get("model") or {}), dict(tree.get("data") or {})
    keys = {item.split("=", 1)[0] for item in chosen}
    out = []
    for tf_key, data_key in (("tf_size", "size"), ("tf_frames", "num_frames")):
        if f"model.{tf_key}" not in keys and tf_key not in model:
            out.append(f"model.{tf_key}={data.get(data_key, getattr(C.DataConfig(), data_key))}")
    return out


def trial_sets(trial: Trial, sets: StudySets, tree: Mapping | None = None) -> list[str]:
    """The ``--set`` list of one trial's finetune: the user's, then the row's, then the seed (and the label
    fraction, below 1).

    tree: the preset (``clman.config.load_tree``) the list is applied on; TimeSformer's
    ``tf_size`` / ``tf_frames`` follow its ``data.size`` / ``data.num_frames`` unless set.
    """
    chosen = [*sets.common, *sets.for_row(trial.row.name), *trial.row.sets]
    fraction = [] if trial.fraction == 1 else [f"{FRACTION_KEY}={trial.fraction!r}"]
    return [
        *sets.common,
        *trial.row.sets,
        *sets.for_row(trial.row.name),
        *_derived(trial.row, chosen, tree),
        f"finetune.seed={trial.seed}",
        *fraction,
    ]


def pretrain_sets(seed: int, sets: StudySets, rows: Sequence[Row]) -> list[str]:
    """The ``--set`` list of the SimCLR run of a (fold, seed), shared by the pretrained rows of ``rows``.

    Its data: ``Split.pretraining_pool`` of that (fold, seed) (train + val + unlabelled), never a test video.
    """
    encoders = {
        tuple(s for s in r.sets if s.split("=", 1)[0] in ("model.arch", *ENCODER_KEYS)) for r in rows if r.pretrained
    }
    assert len(encoders) == 1, f"the pretrained rows must share one encoder, got {sorted(encoders)}"
    return [*sets.common, *encoders.pop(), f"pretrain.seed={seed}"]
