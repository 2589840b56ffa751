"""The manifest: one Parquet row per ingested video (schema in DESIGN.md), and patient-level splits.

Unlabelled videos (for contrastive pretraining only) are rows of split ``unlabeled`` with label
``UNLABELED_LABEL`` (-1) and fold -1: the label column stays int8 and every labelled split keeps
0 / 1, so a reader that selects train / val / test never meets a -1. The two go together (a -1
outside ``unlabeled`` or a 0 / 1 inside it is refused), and since no patient is in two splits, an
unlabelled patient has no labelled video. ``assign_splits`` stratifies the labelled patients only.
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa

from clman import storage

logger = logging.getLogger(__name__)

MANIFEST_SCHEMA = pa.schema(
    [
        ("video_id", pa.string()),
        ("patient_id", pa.string()),
        ("label", pa.int8()),  # 0 benign, 1 malignant, -1 unlabelled (split unlabeled only)
        ("split", pa.string()),  # train | val | test | unlabeled
        ("fold", pa.int8()),  # -1 when unused
        ("uri", pa.string()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("sha256", pa.string()),
        ("source", pa.string()),
    ]
)
COLUMNS = tuple(MANIFEST_SCHEMA.names)
# The manifest's schema version, kept in the Parquet schema metadata under VERSION_KEY. A file
# without it (written before the version was recorded) holds this same schema and reads as current;
# a file of any other version is refused by name rather than misread.
MANIFEST_VERSION = "2"
VERSION_KEY = b"clman.manifest_version"
LABELED_SPLITS = ("train", "val", "test")
UNLABELED = "unlabeled"  # the split of videos without a label: pretraining only
UNLABELED_LABEL = -1  # their label
SPLITS = (*LABELED_SPLITS, UNLABELED)
DEFAULT_RATIOS = (0.6, 0.0, 0.4)


class ManifestError(ValueError):
    """A manifest that breaks the schema or the split rules; the message names the row / column."""


def empty_manifest() -> pd.DataFrame:
    return MANIFEST_SCHEMA.empty_table().to_pandas()


def validate_manifest(df: pd.DataFrame, where: str = "manifest") -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ManifestError(
            f"{where}: missing columns {missing}; manifest version {MANIFEST_VERSION} has {list(COLUMNS)}"
        )
    extra = [c for c in df.columns if c not in COLUMNS]
    if extra:
        raise ManifestError(f"{where}: unexpected columns {extra}; expected {list(COLUMNS)}")
    if df.empty:
        return
    for col in ("video_id", "patient_id", "split", "uri", "sha256"):
        bad = df[col].isna() | (df[col].astype(str) == "")
        if bad.any():
            raise ManifestError(f"{where}: row {int(np.flatnonzero(bad)[0])} has an empty {col}")
    dup = df["video_id"].duplicated()
    if dup.any():
        raise ManifestError(f"{where}: video_id {df['video_id'][dup].iloc[0]!r} appears twice")
    bad = ~df["split"].isin(SPLITS)
    if bad.any():
        raise ManifestError(
            f"{where}: row {int(np.flatnonzero(bad)[0])} split "
            f"{df['split'][bad].iloc[0]!r} is not one of {list(SPLITS)}"
        )
    unlabeled = df["split"] == UNLABELED
    bad = (~unlabeled & ~df["label"].isin([0, 1])) | (unlabeled & (df["label"] != UNLABELED_LABEL))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        label = _scalar(df["label"].iloc[row])
        if unlabeled.iloc[row]:
            raise ManifestError(
                f"{where}: row {row} is in split {UNLABELED!r} with label {label!r}; unlabelled "
                f"videos have label {UNLABELED_LABEL}"
            )
        hint = f" (-1 marks an unlabelled video: split {UNLABELED!r} only)" if label == UNLABELED_LABEL else ""
        raise ManifestError(f"{where}: row {row} label {label!r} is not 0 (benign) or 1 (malignant){hint}")
    bad = unlabeled & (df["fold"] != -1)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        fold = _scalar(df["fold"].iloc[row])
        raise ManifestError(
            f"{where}: row {row} is in split {UNLABELED!r} with fold {fold!r}; unlabelled videos are in no fold (-1)"
        )
    bad = df["num_frames"] < 1
    if bad.any():
        raise ManifestError(f"{where}: video {df['video_id'][bad].iloc[0]!r} has num_frames < 1")
    check_patient_splits(df, where)


def _scalar(value):
    """A numpy scalar as the Python one (``-1``, not ``np.int8(-1)``, in messages)."""
    return value.item() if hasattr(value, "item") else value


def check_patient_splits(df: pd.DataFrame, where: str = "manifest") -> None:
    """No patient in two splits (nor, with folds, in two folds)."""
    for col in ("split", "fold"):
        if col not in df.columns or df.empty:
            continue
        counts = df.groupby("patient_id")[col].nunique()
        if (counts > 1).any():
            pid = counts.index[counts > 1][0]
            values = sorted(map(str, df.loc[df["patient_id"] == pid, col].unique()))
            raise ManifestError(f"{where}: patient {pid!r} is in more than one {col}: {values}")


def to_table(df: pd.DataFrame, where: str = "manifest") -> pa.Table:
    """DataFrame -> Arrow table with exactly MANIFEST_SCHEMA (columns in order, types cast)."""
    validate_manifest(df, where)
    try:
        table = pa.Table.from_pandas(df[list(COLUMNS)], schema=MANIFEST_SCHEMA, preserve_index=False)
    except (pa.ArrowInvalid, pa.ArrowTypeError, ValueError) as err:
        raise ManifestError(f"{where}: does not fit the manifest schema: {err}") from None
    # The version travels in the schema metadata, so every writer of this table (write_manifest,
    # ingest's storage.write_parquet) records it.
    return table.replace_schema_metadata({**(table.schema.metadata or {}), VERSION_KEY: MANIFEST_VERSION.encode()})


def manifest_version(table: pa.Table) -> str | None:
    """The version recorded in a manifest table's schema metadata; None when it has none."""
    value = (table.schema.metadata or {}).get(VERSION_KEY)
    return None if value is None else value.decode("utf-8", errors="replace")


def write_manifest(df: pd.DataFrame, uri: str) -> None:
    """Schema-checked, atomic write (a crash never leaves a half manifest)."""
    storage.write_parquet(to_table(df, uri), uri)


def read_manifest(uri: str, split: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The manifest at ``uri`` (rows of ``split`` only when given), validated.

    Without ``split`` every row comes back, the ``unlabeled`` ones (label -1) too: a reader that
    needs labels selects labelled splits (``labeled``) or names its splits.
    """
    table = storage.read_parquet(uri)
    version = manifest_version(table)
    if version is not None and version != MANIFEST_VERSION:
        raise ManifestError(
            f"{uri}: manifest version {version!r}, this clman reads version "
            f"{MANIFEST_VERSION!r}; write it again with this clman's jobs.ingest, or use "
            "the clman that wrote it"
        )
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise ManifestError(
            f"{uri}: missing columns {missing}; manifest version {MANIFEST_VERSION} has {list(COLUMNS)}"
        )
    df = table.select(list(COLUMNS)).cast(MANIFEST_SCHEMA).to_pandas()
    validate_manifest(df, uri)
    if split is not None:
        wanted = [split] if isinstance(split, str) else list(split)
        for s in wanted:
            if s not in SPLITS:
                raise ManifestError(f"{uri}: unknown split {s!r}; valid: {list(SPLITS)}")
        df = df[df["split"].isin(wanted)].reset_index(drop=True)
    return df


def labeled(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``df`` that carry a label (every split but ``unlabeled``)."""
    return df[df["split"] != UNLABELED].reset_index(drop=True)


def check_labeled_split(split: str, where: str) -> None:
    """A one-line ManifestError when ``split`` has no labels (``unlabeled``): nothing to score or finetune."""
    if split == UNLABELED:
        raise ManifestError(
            f"{where}: split {UNLABELED!r} holds videos without a label (pretraining only); "
            f"choose one of {list(LABELED_SPLITS)}"
        )


def parse_ratios(text: str | Sequence[float]) -> tuple[float, float, float]:
    """'0.6,0.0,0.4' -> (0.6, 0.0, 0.4): train, val, test; non-negative, summing to 1."""
    if isinstance(text, str):
        try:
            values = [float(v) for v in text.split(",")]
        except ValueError:
            raise ManifestError(f"split ratios {text!r}: expected three numbers like 0.6,0.0,0.4") from None
    else:
        values = [float(v) for v in text]
    if len(values) != 3:
        raise ManifestError(f"split ratios {text!r}: expected three numbers (train,val,test), got {len(values)}")
    if any(v < 0 or not np.isfinite(v) for v in values):
        raise ManifestError(f"split ratios {text!r}: every ratio must be >= 0")
    if abs(sum(values) - 1.0) > 1e-6:
        raise ManifestError(f"split ratios {text!r}: must sum to 1, they sum to {sum(values):g}")
    return values[0], values[1], values[2]


def _allocate(n: int, ratios: Sequence[float]) -> list[int]:
    """Largest-remainder split of n items by ratios (counts sum to n)."""
    exact = np.asarray(ratios) * n
    counts = np.floor(exact).astype(int)
    order = np.argsort(-(exact - counts), kind="stable")
    for i in order[: n - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _stratified_counts(sizes: Sequence[int], ratios: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """(strata, splits) patient counts: each within one of its exact quota, totals per split
    exactly the largest-remainder split of all patients.

    Rounding each stratum alone would send every single-patient stratum to
    'train'; here the leftover patients of all strata are placed together.
    """
    quota = np.outer(sizes, ratios)  # (S, 3) exact
    counts = np.floor(quota).astype(int)
    left_in_stratum = np.asarray(sizes) - counts.sum(axis=1)
    left_in_split = np.asarray(_allocate(int(sum(sizes)), ratios)) - counts.sum(axis=0)
    frac = quota - counts
    # Largest remainder first; ties broken at random (seeded) so no label is favoured.
    tie = rng.random(quota.shape)
    cells = sorted(np.ndindex(*quota.shape), key=lambda c: (-frac[c], tie[c]))
    for s, j in cells:
        if frac[s, j] > 0 and left_in_stratum[s] > 0 and left_in_split[j] > 0:
            counts[s, j] += 1
            left_in_stratum[s] -= 1
            left_in_split[j] -= 1
    for s in range(len(sizes)):  # whatever is left: any split still short of its total
        for j in np.argsort(-np.asarray(ratios), kind="stable"):
            take = min(left_in_stratum[s], left_in_split[j])
            counts[s, j] += take
            left_in_stratum[s] -= take
            left_in_split[j] -= take
    return counts


def patient_labels(df: pd.DataFrame) -> pd.Series:
    """Patient -> label used for stratification: 1 if any of their videos is malignant."""
    return df.groupby("patient_id")["label"].max().sort_index()


def assign_splits(
    df: pd.DataFrame, ratios: Sequence[float] = DEFAULT_RATIOS, folds: int = 0, seed: int = 0, strict: bool = True
) -> pd.DataFrame:
    """A copy of ``df`` with ``split`` and ``fold`` set per patient, stratified by label.

    strict=False (patients added to an existing manifest): a split or fold may stay empty.
    Only labelled rows are stratified (the draw is the same with or without unlabelled rows
    beside them); rows with label -1 get split ``unlabeled`` and fold -1.

    ratios: (train, val, test) fractions of patients in each label stratum.
    folds > 1: K-fold cross-validation instead; every patient gets a fold
    0..K-1 (balanced per label) and split 'train' — fold k is the held-out set
    of run k. The same rows and seed always give the same assignment.
    """
    if df.empty:
        raise ManifestError("cannot assign splits: no videos")
    unlabeled = df["label"] == UNLABELED_LABEL
    if unlabeled.any():
        mixed = set(df.loc[unlabeled, "patient_id"]) & set(df.loc[~unlabeled, "patient_id"])
        if mixed:
            raise ManifestError(
                f"patient {sorted(mixed)[0]!r} has labelled and unlabelled videos; a patient's "
                "videos are all labelled or all unlabelled"
            )
        out = df.copy()
        out.loc[unlabeled, "split"], out.loc[unlabeled, "fold"] = UNLABELED, -1
        if (~unlabeled).any():
            placed = assign_splits(df[~unlabeled], ratios, folds, seed, strict)
            out.loc[placed.index, "split"], out.loc[placed.index, "fold"] = placed["split"], placed["fold"]
        out["fold"] = out["fold"].astype("int8")
        return out
    labels = patient_labels(df)  # index sorted by patient_id: order of input rows does not matter
    rng = np.random.default_rng(seed)
    split_of: dict[str, str] = {}
    fold_of: dict[str, int] = {}
    if folds:
        if folds < 2:
            raise ManifestError(f"folds must be 0 (no folds) or >= 2, got {folds}")
        if strict and folds > len(labels):
            raise ManifestError(f"{folds} folds need at least {folds} patients, have {len(labels)}")
        offset = 0
        for label in sorted(labels.unique()):
            patients = rng.permutation(labels.index[labels == label].to_numpy())
            for i, pid in enumerate(patients):
                # Continue the round-robin across strata so small strata do not
                # all land in fold 0.
                fold_of[pid] = (offset + i) % folds
                split_of[pid] = "train"
            offset += len(patients)
    else:
        ratios = parse_ratios(ratios)
        strata = [rng.permutation(labels.index[labels == label].to_numpy()) for label in sorted(labels.unique())]
        table = _stratified_counts([len(p) for p in strata], ratios, rng)
        for patients, counts in zip(strata, table):
            bounds = np.cumsum([0, *counts])
            for name, lo, hi in zip(LABELED_SPLITS, bounds[:-1], bounds[1:]):
                for pid in patients[lo:hi]:
                    split_of[pid] = name
                    fold_of[pid] = -1
        for name, ratio in zip(LABELED_SPLITS, ratios):
            if strict and ratio > 0 and name not in split_of.values():
                raise ManifestError(
                    f"split {name!r} would be empty: ratio {ratio:g} of {len(labels)} patients "
                    f"({ {int(k): int(v) for k, v in labels.value_counts().sort_index().items()} } "
                    "per label); add videos or "
                    "change --split"
                )
    out = df.copy()
    out["split"] = out["patient_id"].map(split_of)
    out["fold"] = out["patient_id"].map(fold_of).astype("int8")
    if folds:
        used = set(fold_of.values())
        if strict and len(used) < folds:
            raise ManifestError(f"{folds} folds: only {len(used)} would hold patients")
    return out


def carve_validation(train: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train, val): ``fraction`` of ``train``'s patients, per label, drawn from ``seed`` by :func:`assign_splits`.

    The one validation carve of finetune jobs (``clman.train.finetune.validation_split``) and studies
    (``clman.study.folds.carve_validation``): no patient on both sides, the same rows and seed give the
    same carve whatever their order. The rows keep their columns, the val rows with split ``val``; both
    callers check that each side keeps both classes (and say so in their own words). When not one patient
    falls to val (too few patients), val is empty.
    """
    try:
        # assign_splits rewrites split and fold: take only which patients it sends to val.
        val_patients = set(
            assign_splits(train, (1.0 - fraction, fraction, 0.0), seed=seed).query("split == 'val'")["patient_id"]
        )
    except ManifestError:  # not one patient falls to val: the callers report it with the counts
        val_patients = set()
    is_val = train["patient_id"].isin(val_patients)
    return train[~is_val].reset_index(drop=True), train[is_val].assign(split="val").reset_index(drop=True)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Videos and patients per split (and fold) and label, for the ingest summary.

    The ``unlabeled`` split shows 0 benign and 0 malignant: its videos are all unlabelled.
    """
    keys = ["split"] + (["fold"] if (df["fold"] >= 0).any() else [])
    g = df.groupby(keys)
    return pd.DataFrame(
        {
            "videos": g.size(),
            "patients": g["patient_id"].nunique(),
            "benign": g["label"].apply(lambda s: int((s == 0).sum())),
            "malignant": g["label"].apply(lambda s: int((s == 1).sum())),
        }
    )
