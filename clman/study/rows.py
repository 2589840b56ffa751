"""The rows of the paper's Tables 1-4: what each trains, and the numbers the paper reports.

A row is one model recipe: the ``--set`` overrides it applies to the finetune config, whether
its encoder starts from the SimCLR checkpoint of its (fold, seed), and the paper's six numbers
for the reference column. A row shared by two tables is one row, trained once: the paper's
"ResNet18 + GN + NL (ours)" of Table 1 is "Without CL Guided" of Table 2 (same numbers), and
CLMAN is "With CL" (Table 2), "With Multi-meta Attn" (Table 3) and the last row of Table 4.

Facts that shaped this module
- Every CLMAN row sets ``model.norm``, ``model.nonlocal_stages`` and ``model.aggregator``
  explicitly, defaults included, so a preset that changes them (``jobs/configs/*.yaml``)
  cannot change what a row means.
- The paper's Table 4 names "TSM" and "TIN Res18/34/50" without saying TSM's depth; the
  ResNet-18 TSM (``tsm_18``) is the one that matches the paper's ResNet-18 budget (README
  "Baselines"). Its "TimesFormer" is ``timesformer``.
- Paper numbers are copied from the text of Tables 1-4 (``../shared/paper/clman-paper.txt``),
  in %, as printed.
- Ablation rows (``Row.ablation``) are not the paper's: their paper numbers are NaN (study.md
  prints n/a) and a study trains them only when ``--rows`` names them, so the default study is
  the paper's 20 rows. ``mma_unbounded`` is CLMAN with the tanh of multi-meta attention's last
  layer dropped (``model.mma_bound=none``): Eq. 4's tanh keeps two frames' weights within a
  factor e^2, so one salient frame of 100 gets at most 7 % of the weight. ``linear_probe`` is
  CLMAN with its SimCLR encoder frozen (``finetune.encoder_lr_scale=0``: no gradient, eval
  mode), so only multi-meta attention and the classifier learn: how much the pretrained
  features alone carry, the third line of the label-efficiency curve (``clman.study.curve``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

from clman.config import ConfigError
from clman.metrics import METRIC_NAMES


class StudyError(ConfigError):
    """Bad study input (a table, row, --set key, manifest fold); the message is one line.

    A ConfigError (a ValueError), so ``clman.cli`` prints it as one line with exit status 2
    like any other input a user can fix from the message alone.
    """


@dataclass(frozen=True)
class Row:
    name: str  # what --rows takes
    titles: tuple[tuple[int, str], ...]  # (table, the paper's method name there), in table order
    sets: tuple[str, ...]  # --set overrides on the finetune config
    pretrained: bool  # the encoder starts from the (fold, seed) SimCLR checkpoint
    paper: tuple[float, ...]  # Acc, AP, Sens, Spec, F1, AUC in %, as printed in the paper (NaN: not in it)
    ablation: bool = False  # not a row of the paper: trained only when --rows names it

    @property
    def tables(self) -> tuple[int, ...]:
        return tuple(t for t, _ in self.titles)

    def title(self, table: int) -> str:
        return dict(self.titles)[table]

    @property
    def arch(self) -> str:
        return dict(s.split("=", 1) for s in self.sets)["model.arch"]

    @property
    def keys(self) -> tuple[str, ...]:
        """The config keys this row sets itself."""
        return tuple(s.split("=", 1)[0] for s in self.sets)

    @property
    def paper_metrics(self) -> dict[str, float]:
        """The paper's numbers as fractions, keyed like ``clman.metrics.METRIC_NAMES``."""
        return {k: v / 100 for k, v in zip(METRIC_NAMES, self.paper)}


def _clman(norm: str, nonlocal_stages: str, aggregator: str = "mma") -> tuple[str, ...]:
    return (
        "model.arch=clman",
        f"model.norm={norm}",
        f"model.nonlocal_stages={nonlocal_stages}",
        f"model.aggregator={aggregator}",
    )


def _baseline(arch: str) -> tuple[str, ...]:
    return (f"model.arch={arch}",)


GN_NL = _clman("group", "[3, 4]")
NOT_IN_PAPER = (math.nan,) * 6
# In the paper's order of Tables 1, 2, 3, 4; CLMAN closes Tables 2-4.
ROWS: tuple[Row, ...] = (
    # Table 1: encoder ablation, multi-meta attention, no contrastive pretraining
    Row(
        "vanilla",
        ((1, "ResNet18 (vanilla)"),),
        _clman("batch", "[]"),
        False,
        (70.09, 77.68, 75.00, 68.67, 78.08, 71.75),
    ),
    Row("gn", ((1, "ResNet18 + GN"),), _clman("group", "[]"), False, (74.77, 77.01, 74.29, 75.00, 80.00, 74.93)),
    Row("nl", ((1, "ResNet18 + NL"),), _clman("batch", "[3, 4]"), False, (80.37, 84.08, 78.05, 81.82, 83.72, 83.01)),
    Row(
        "gn_nl",
        ((1, "ResNet18 + GN + NL (ours)"), (2, "Without CL Guided")),
        GN_NL,
        False,
        (82.24, 81.16, 82.05, 82.35, 85.50, 84.85),
    ),
    # Not the paper's: the SimCLR encoder frozen, only attention + classifier trained (ablation, opt-in;
    # the third line of jobs.study --label-fractions)
    Row(
        "linear_probe",
        ((2, "Linear probe (CL encoder frozen)"),),
        GN_NL + ("finetune.encoder_lr_scale=0",),
        True,
        NOT_IN_PAPER,
        ablation=True,
    ),
    # Table 3: the aggregators on the pretrained GN + NL encoder
    Row(
        "external_attention",
        ((3, "With External Attention"),),
        _clman("group", "[3, 4]", "external_attention"),
        True,
        (79.44, 81.39, 76.19, 81.54, 82.81, 79.98),
    ),
    Row(
        "self_attention",
        ((3, "With Self-attention"),),
        _clman("group", "[3, 4]", "self_attention"),
        True,
        (80.37, 77.85, 79.49, 80.88, 83.97, 78.50),
    ),
    Row(
        "emsa",
        ((3, "With Efficient Multi-head Self-attention"),),
        _clman("group", "[3, 4]", "emsa"),
        True,
        (80.37, 78.51, 81.08, 80.00, 84.21, 77.49),
    ),
    Row(
        "lstm", ((3, "With LSTM"),), _clman("group", "[3, 4]", "lstm"), True, (83.18, 77.91, 96.43, 78.48, 87.32, 79.47)
    ),
    Row(
        "mean",
        ((3, "With Average"),),
        _clman("group", "[3, 4]", "mean"),
        True,
        (86.92, 85.26, 96.88, 82.67, 89.86, 87.48),
    ),
    Row(
        "max",
        ((3, "With Max-pooling"),),
        _clman("group", "[3, 4]", "max"),
        True,
        (85.05, 88.12, 80.43, 88.52, 87.10, 87.52),
    ),
    # Not the paper's: MMA whose last layer has no tanh (an unbounded softmax over frames; ablation, opt-in)
    Row(
        "mma_unbounded",
        ((3, "CLMAN (MMA, unbounded)"),),
        GN_NL + ("model.mma_bound=none",),
        True,
        NOT_IN_PAPER,
        ablation=True,
    ),
    # Table 4: other video classifiers, from scratch
    Row("r3d_18", ((4, "R3D"),), _baseline("r3d_18"), False, (75.70, 80.03, 82.14, 73.42, 81.69, 77.56)),
    Row(
        "timesformer",
        ((4, "TimeSformer"),),
        _baseline("timesformer"),
        False,
        (77.57, 71.34, 77.78, 77.46, 82.09, 72.08),
    ),
    Row("mc3_18", ((4, "MC3"),), _baseline("mc3_18"), False, (77.57, 80.83, 81.25, 76.00, 82.61, 78.86)),
    Row("p3d", ((4, "P3D"),), _baseline("p3d"), False, (80.37, 81.33, 89.66, 76.92, 85.11, 81.28)),
    Row("r2plus1d_18", ((4, "R(2+1)D"),), _baseline("r2plus1d_18"), False, (82.24, 87.36, 90.32, 78.95, 86.33, 84.85)),
    Row("tin_34", ((4, "TIN Res34"),), _baseline("tin_34"), False, (84.48, 86.85, 82.33, 86.35, 86.87, 86.79)),
    Row("tin_50", ((4, "TIN Res50"),), _baseline("tin_50"), False, (85.05, 85.53, 88.94, 83.10, 88.06, 86.66)),
    Row("tin_18", ((4, "TIN Res18"),), _baseline("tin_18"), False, (85.24, 89.52, 82.50, 87.11, 87.52, 87.30)),
    Row("tsm_18", ((4, "TSM"),), _baseline("tsm_18"), False, (86.92, 89.72, 91.67, 84.51, 89.55, 90.22)),
    # CLMAN: GN + NL encoder, SimCLR-pretrained, multi-meta attention
    Row(
        "clman",
        ((2, "With CL (ours)"), (3, "With Multi-meta Attn (ours)"), (4, "CLMAN (ours)")),
        GN_NL,
        True,
        (88.79, 92.78, 94.44, 85.92, 91.04, 92.64),
    ),
)
BY_NAME = {r.name: r for r in ROWS}
REFERENCE = "clman"  # every row's AUC is tested against this row's, on the same videos
TABLES = (1, 2, 3, 4)
TABLE_TITLES = {
    1: "Table 1 — encoder ablation (multi-meta attention, no contrastive pretraining)",
    2: "Table 2 — contrastive pretraining (GN + NL encoder, multi-meta attention)",
    3: "Table 3 — aggregators (pretrained GN + NL encoder)",
    4: "Table 4 — other video classifiers (from scratch) and CLMAN",
}


def table_rows(table: int) -> tuple[Row, ...]:
    """The rows of ``table`` in the paper's order (``ROWS`` is in that order, CLMAN last)."""
    return tuple(r for r in ROWS if table in r.tables)


def parse_tables(tables: str | Iterable[int] | None) -> tuple[int, ...]:
    """``"1,2,4"`` or ``[1, 2, 4]`` -> (1, 2, 4); None -> all four. Unknown numbers fail in one line."""
    if tables is None:
        return TABLES
    items = [t.strip() for t in tables.split(",") if t.strip()] if isinstance(tables, str) else list(tables)
    out = []
    for t in items:
        try:
            n = int(t)
        except (TypeError, ValueError):
            n = None
        if n not in TABLES:
            raise StudyError(f"--tables: unknown table {t!r}; valid: {', '.join(map(str, TABLES))}")
        if n not in out:
            out.append(n)
    if not out:
        raise StudyError(f"--tables: no table given; valid: {', '.join(map(str, TABLES))}")
    return tuple(sorted(out))


def select_rows(
    tables: str | Iterable[int] | None = None, names: str | Sequence[str] | None = None, reference: bool = True
) -> tuple[Row, ...]:
    """The rows to train, each once, in ``ROWS`` order.

    tables: the tables whose rows to train (None: all four). names: only these rows of those
    tables (None: all of them but the ablation rows, which train only when named). reference:
    add CLMAN when it is not selected, since every row's AUC is tested against CLMAN's on the
    same videos. A name that is not a row of the selected tables fails in one line listing the
    valid ones.
    """
    chosen = parse_tables(tables)
    valid = [r.name for r in ROWS if set(r.tables) & set(chosen)]
    if names is None:
        wanted = {n for n in valid if not BY_NAME[n].ablation}
    else:
        items = [n.strip() for n in names.split(",") if n.strip()] if isinstance(names, str) else list(names)
        for n in items:
            if n not in valid:
                where = f"tables {','.join(map(str, chosen))}"
                raise StudyError(f"--rows: unknown row {n!r} for {where}; valid: {', '.join(valid)}")
        if not items:
            raise StudyError(f"--rows: no row given; valid: {', '.join(valid)}")
        wanted = set(items)
    if reference:
        wanted.add(REFERENCE)
    return tuple(r for r in ROWS if r.name in wanted)


def row(name: str) -> Row:
    """The row called ``name``; an unknown name fails in one line listing the valid ones."""
    if name not in BY_NAME:
        raise StudyError(f"unknown row {name!r}; valid: {', '.join(BY_NAME)}")
    return BY_NAME[name]
