"""Which videos train, validate and test each (fold, seed) of a study.

Two protocols, both by patient (no patient on two sides):
- k-fold: the manifest's ``fold`` column, written by ``jobs.ingest --folds K``
  (``clman.data.manifest.assign_splits``: patients dealt round-robin per label, so the folds
  are stratified). Fold k tests on the patients of fold k and trains on the others.
- holdout (``--holdout``): the manifest's fixed train / test split, the paper's protocol.

The validation videos that pick the checkpoint come from the training side only: the
manifest's val split in holdout when it has one, else a share of the training patients
carved per label from the trial's seed by ``clman.data.manifest.carve_validation`` — the carve
``clman.train.finetune.validation_split`` makes too, so a (fold, seed) gives the same validation
patients to every row, and the rows are compared on the same footing.

Unlabelled videos (split ``unlabeled``, label -1, fold -1: ``jobs.ingest`` with empty labels or
``--unlabeled``) are in no fold and on no side: the folds, the holdout checks and the carve see
the labelled rows only. Every (fold, seed) adds all of them to its SimCLR pool
(``Split.pretraining_pool`` = its train + val + the unlabelled videos, never its test videos);
their patients have no labelled video (``clman.data.manifest``), so none is a held-out patient.
A manifest without any simply gives a pool of train + val: there is no study option that asks
for them, so nothing fails when there are none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from clman.data import manifest as M
from clman.data.manifest import UNLABELED, ManifestError, check_patient_splits, labeled
from clman.study.rows import StudyError

HOLDOUT = -1  # the fold number of the manifest's fixed train/test split


@dataclass(frozen=True, eq=False)
class Split:
    """The videos of one (fold, seed): manifest rows, their ``split`` set to train / val / test."""

    fold: int  # HOLDOUT for the manifest's fixed split
    seed: int
    train: pd.DataFrame
    val: pd.DataFrame  # empty when finetune.val_fraction = 0 and the manifest has no val split
    test: pd.DataFrame
    note: str  # one line: where the validation videos come from
    unlabeled: pd.DataFrame = field(default_factory=pd.DataFrame)  # the manifest's unlabelled videos, all

    def manifest(self) -> pd.DataFrame:
        """One manifest (DataFrame) with split train / val / test (and the unlabelled videos as split
        ``unlabeled``), for ``write_manifest``, finetune (train / val) and SimCLR (its pool)."""
        parts = [self.train.assign(split="train"), self.val.assign(split="val"), self.test.assign(split="test")]
        if len(self.unlabeled):
            parts.append(self.unlabeled.assign(split=UNLABELED))
        return pd.concat(parts, ignore_index=True)

    @property
    def training_folds(self) -> pd.DataFrame:
        """Train + val: the labelled videos SimCLR pretraining of this (fold, seed) may see (never a test video)."""
        return pd.concat([self.train, self.val], ignore_index=True)

    @property
    def pretraining_pool(self) -> pd.DataFrame:
        """What SimCLR of this (fold, seed) reads: train + val + every unlabelled video, never a test video."""
        return (
            pd.concat([self.training_folds, self.unlabeled], ignore_index=True)
            if len(self.unlabeled)
            else self.training_folds
        )


def _classes(rows: pd.DataFrame) -> str:
    b, m = int((rows["label"] == 0).sum()), int((rows["label"] == 1).sum())
    return f"{b} benign + {m} malignant videos of {rows['patient_id'].nunique()} patients"


@dataclass(frozen=True, eq=False)
class FoldPlan:
    """The checked manifest and the folds of a study; ``split(fold, seed)`` gives a trial's videos."""

    manifest: pd.DataFrame  # the labelled rows
    folds: tuple[int, ...]  # (HOLDOUT,) for --holdout
    where: str = "manifest"
    unlabeled: pd.DataFrame = field(default_factory=pd.DataFrame)  # split ``unlabeled``: SimCLR pool only

    @property
    def holdout(self) -> bool:
        return self.folds == (HOLDOUT,)

    def describe(self) -> str:
        df = self.manifest
        head = f"{len(df)} videos of {df['patient_id'].nunique()} patients ({int((df['label'] == 1).sum())} malignant)"
        if len(self.unlabeled):
            head += (
                f" and {len(self.unlabeled)} unlabelled videos of {self.unlabeled['patient_id'].nunique()} "
                "other patients (in every SimCLR run, never finetuned or tested on)"
            )
        if self.holdout:
            test = df[df["split"] == "test"]
            return f"{head}; the manifest's fixed train/test split ({len(test)} test videos)"
        return f"{head}; {len(self.folds)}-fold cross-validation by patient, stratified by label (manifest `fold`)"

    def split(self, fold: int, seed: int, val_fraction: float = 0.2) -> Split:
        """The train / val / test videos of (fold, seed); the val patients are drawn from ``seed``."""
        if fold not in self.folds:
            raise StudyError(f"fold {fold} is not in this study; folds: {list(self.folds)}")
        df = self.manifest
        if self.holdout:
            train, val, test = (df[df["split"] == s].reset_index(drop=True) for s in ("train", "val", "test"))
        else:
            test = df[df["fold"] == fold].reset_index(drop=True)
            train = df[df["fold"] != fold].reset_index(drop=True)
            val = train.iloc[:0]
        pool = self.unlabeled
        if len(val):
            return Split(fold, seed, train, val, test, f"validation: the manifest's val split ({_classes(val)})", pool)
        if val_fraction == 0:
            return Split(
                fold,
                seed,
                train,
                val,
                test,
                "no validation (finetune.val_fraction=0): the last checkpoint is kept",
                pool,
            )
        train, val = carve_validation(train, val_fraction, seed, f"{self.where} fold {fold}")
        return Split(
            fold,
            seed,
            train,
            val,
            test,
            f"validation: {_classes(val)} carved from the training folds "
            f"(finetune.val_fraction={val_fraction:g}, seed {seed})",
            pool,
        )


def carve_validation(train: pd.DataFrame, fraction: float, seed: int, where: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): ``fraction`` of the training patients, per label, drawn from ``seed``
    (``clman.data.manifest.carve_validation``, the finetune job's carve too); both keep both classes."""
    kept, val = M.carve_validation(train, fraction, seed)
    if kept["label"].nunique() < 2 or val["label"].nunique() < 2:
        raise StudyError(
            f"{where}: finetune.val_fraction={fraction:g} of the training patients "
            f"({_classes(train)}) leaves a class out of train ({_classes(kept)}) or validation "
            f"({_classes(val)}); change finetune.val_fraction or use fewer folds"
        )
    return kept, val


def plan_folds(
    manifest: pd.DataFrame, folds: int | None = None, holdout: bool = False, where: str = "manifest"
) -> FoldPlan:
    """Check ``manifest`` for ``folds`` = K (k-fold) or ``holdout``; every problem is one StudyError line.

    k-fold: the manifest's folds must be exactly 0..K-1 (``jobs.ingest --folds K``), every labelled
    video in one, each holding both classes (a one-class fold has no AUC). holdout: train and test
    splits, each with both classes. Unlabelled rows (split ``unlabeled``) are set apart as
    ``FoldPlan.unlabeled``: in no fold, on no side, in every SimCLR pool.
    """
    if holdout == (folds is not None):
        raise StudyError("give either --folds K or --holdout")
    whole = manifest.reset_index(drop=True)
    try:
        check_patient_splits(whole, where)
    except ManifestError as e:
        raise StudyError(str(e)) from None
    df, pool = labeled(whole), whole[whole["split"] == UNLABELED].reset_index(drop=True)
    if df.empty:
        raise StudyError(
            f"{where}: no labelled videos (only {len(pool)} unlabelled ones)" if len(pool) else f"{where}: no videos"
        )
    if holdout:
        for name in ("train", "test"):
            part = df[df["split"] == name]
            if part.empty:
                hint = " (it was ingested with --folds: use --folds)" if (df["fold"] >= 0).any() else ""
                raise StudyError(f"{where}: --holdout needs a {name!r} split, the manifest has none{hint}")
            if part["label"].nunique() < 2:
                raise StudyError(
                    f"{where}: split {name!r} holds one class only ({_classes(part)}); "
                    "re-ingest with another --seed or --split"
                )
        return FoldPlan(df, (HOLDOUT,), where, pool)
    if not isinstance(folds, int) or isinstance(folds, bool) or folds < 2:
        raise StudyError(f"--folds must be an integer >= 2, got {folds!r}")
    present = sorted(int(f) for f in df["fold"].unique())
    if present == [-1]:
        raise StudyError(
            f"{where}: --folds {folds}: the manifest has no folds (every fold is -1); "
            f"ingest with `jobs.ingest --folds {folds}`, or use --holdout"
        )
    if -1 in present:
        n = int((df["fold"] == -1).sum())
        raise StudyError(
            f"{where}: --folds {folds}: {n} videos have no fold (-1) beside folds "
            f"{[f for f in present if f >= 0]}; re-ingest with `jobs.ingest --folds {folds}`"
        )
    if present != list(range(folds)):
        raise StudyError(
            f"{where}: --folds {folds}: the manifest has {len(present)} folds {present}, "
            f"not 0..{folds - 1}; pass --folds {len(present)} or re-ingest with "
            f"`jobs.ingest --folds {folds}`"
        )
    for f in present:
        part = df[df["fold"] == f]
        if part["label"].nunique() < 2:
            only = "benign" if int(part["label"].iloc[0]) == 0 else "malignant"
            raise StudyError(
                f"{where}: fold {f} holds only {only} videos ({_classes(part)}), so its AUC is "
                "undefined; re-ingest with fewer --folds or another --seed"
            )
    return FoldPlan(df, tuple(present), where, pool)
