"""Job configurations: one frozen dataclass per job, strict YAML + ``--set`` loading.

A preset file (``jobs/configs/*.yaml``) holds sections named after the
sub-configs and jobs::

    model:    {width: 0.25, aggregator: mma, mma_depth: 1}
    data:     {size: 64, num_frames: 8}
    scale:    {num_workers: 2}
    pretrain: {epochs: 20, batch_size: 64}
    finetune: {epochs: 30, lr: 1e-3}
    evaluate: {frames: all}

Every section is checked against its dataclass when the file is loaded, so a
typo anywhere fails before any work starts, naming the key and the allowed
keys. Overrides use dotted keys: ``--set finetune.lr=3e-4 --set model.mma_depth=2``.
The defaults are the paper's recipe (Sections 3 and 4.3).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A bad config key, type or value; the message names the key."""


NORMS = ("batch", "group")
AGGREGATORS = ("mma", "mean", "max", "lstm", "self_attention", "external_attention", "emsa")
MMA_BOUNDS = ("tanh", "none")  # model.mma_bound: the activation of multi-meta attention's last layer
EVAL_FRAMES = ("clips", "all")  # evaluate.frames: how validation and test score a video (clman/data/sampling.py)
# model.arch: CLMAN, or a comparison method of the paper's Table 4 (+ s3d, swin3d_t, mvit_v2_s); docs/models.md
ARCHS = (
    "clman", "r3d_18", "mc3_18", "r2plus1d_18", "p3d", "timesformer", "tin_18", "tin_34", "tin_50",
    "tsm_18", "tsm_50", "s3d", "swin3d_t", "mvit_v2_s",
)  # fmt: skip


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "clman"  # or a Table 4 baseline (ARCHS); baselines ignore the CLMAN fields norm .. proj_layers
    weights: str | None = None  # path / s3:// URI: a state dict or clman checkpoint of this arch; never downloaded
    norm: str = "group"  # the paper's GN; "batch" for the vanilla ResNet-18 row
    nonlocal_stages: tuple[int, ...] = (3, 4)  # the paper's NL; () = vanilla
    width: float = 1.0  # channel multiplier; 0.125-0.25 for CPU demos and tests
    gn_groups: int = 32
    aggregator: str = "mma"
    mma_depth: int = 1  # L cascaded Linear+Tanh layers in multi-meta attention
    # tanh (the paper's Eq. 4): attention logits in [-1, 1], so two frames' weights differ by at most e^2
    # (one salient frame of 100 gets <= 7 %); none: the last layer is linear, the softmax unbounded (mma only)
    mma_bound: str = "tanh"
    proj_dim: int = 128  # SimCLR projection output
    proj_layers: int = 2
    # TimeSformer only: ViT-B/16 by default; embeddings learned for tf_size px frames and tf_frames frames
    tf_dim: int = 768
    tf_depth: int = 12
    tf_heads: int = 12  # must divide tf_dim
    tf_patch: int = 16
    tf_size: int = 224  # other frame sizes resample the position embedding (keep it = data.size)
    tf_frames: int = 16  # other clip lengths resample the time embedding (keep it = data.num_frames)

    def check(self, where: str) -> None:
        _one_of(where, "arch", self.arch, ARCHS)
        if self.weights is not None:
            scheme = self.weights.split("://", 1)[0] if "://" in self.weights else None
            if not self.weights.strip() or scheme not in (None, "s3", "file"):
                raise ConfigError(
                    f"{where}.weights: must be a local path or s3:// URI (clman never downloads weights), "
                    f"got {self.weights!r}"
                )
        _one_of(where, "norm", self.norm, NORMS)
        _one_of(where, "aggregator", self.aggregator, AGGREGATORS)
        for s in self.nonlocal_stages:
            _one_of(where, "nonlocal_stages[]", s, (3, 4))
        _positive(where, "width", self.width)
        _at_least(where, "gn_groups", self.gn_groups, 1)
        _at_least(where, "mma_depth", self.mma_depth, 1)
        _one_of(where, "mma_bound", self.mma_bound, MMA_BOUNDS)
        _at_least(where, "proj_dim", self.proj_dim, 1)
        _at_least(where, "proj_layers", self.proj_layers, 1)
        for key in ("tf_dim", "tf_depth", "tf_heads", "tf_patch", "tf_frames"):
            _at_least(where, key, getattr(self, key), 1)
        _at_least(where, "tf_size", self.tf_size, self.tf_patch)
        if self.tf_dim % self.tf_heads:
            raise ConfigError(f"{where}.tf_heads: must divide tf_dim = {self.tf_dim}, got {self.tf_heads}")


CACHE_MODES = ("auto", "memory", "off")


@dataclass(frozen=True)
class DataConfig:
    """What the CPU decodes and how the worker's device augments it (clman/data/augment.py).

    Decode tasks return uint8 frames at ``store_size`` (one channel for grayscale B-mode);
    everything per-pixel after decoding runs on the training worker's device, in batch.
    """

    size: int = 224  # frames are cropped / resized to size x size on the device
    store_size: int = 0  # decoded frames are stored at this size; 0 = auto: size * 8 / 7 (256 for 224)
    num_frames: int = 16  # T, frames per finetuning clip (paper: 16)
    frames_per_clip: int = 4  # M, frames drawn per clip for SimCLR
    crop_scale_min: float = 0.5  # finetune random resized crop: area share in [crop_scale_min, 1]
    simclr_scale_min: float = 0.2  # SimCLR random resized crop: area share in [simclr_scale_min, 1]
    elastic_p: float = 0.2  # probability of the elastic deformation (finetune; SimCLR uses simclr_elastic_p)
    simclr_elastic_p: float = 0.5
    cache: str = "auto"  # decode every video once and keep the frames in the object store: auto | memory | off
    cache_fraction: float = 0.5  # auto caches when the decoded data set fits this share of the object store
    decode_tasks: int | str = "auto"  # decode tasks in flight; auto = as many as the CPUs the workers leave free
    decode_cpus: float = 0.5  # CPUs per decode task (fractional leaves room for Train workers)

    def check(self, where: str) -> None:
        _at_least(where, "size", self.size, 8)
        if self.store_size:
            _at_least(where, "store_size", self.store_size, self.size)
        _at_least(where, "num_frames", self.num_frames, 1)
        _at_least(where, "frames_per_clip", self.frames_per_clip, 1)
        _in_range(where, "crop_scale_min", self.crop_scale_min, 0.05, 1.0)
        _in_range(where, "simclr_scale_min", self.simclr_scale_min, 0.05, 1.0)
        _in_range(where, "elastic_p", self.elastic_p, 0.0, 1.0)
        _in_range(where, "simclr_elastic_p", self.simclr_elastic_p, 0.0, 1.0)
        _one_of(where, "cache", self.cache, CACHE_MODES)
        _in_range(where, "cache_fraction", self.cache_fraction, 0.01, 0.95)
        if isinstance(self.decode_tasks, str):
            _one_of(where, "decode_tasks", self.decode_tasks, ("auto",))
        else:
            _at_least(where, "decode_tasks", self.decode_tasks, 1)
        _positive(where, "decode_cpus", self.decode_cpus)

    @property
    def stored_size(self) -> int:
        """The side of the decoded frames: a margin above ``size`` for the random crop."""
        return self.store_size or -(-self.size * 8 // 7)


# pretrain.same_video: what the other frames of an anchor's video are in NT-Xent (clman/losses.py)
SAME_VIDEO = ("negative", "mask", "positive")

PRECISIONS = ("auto", "bf16", "fp32")
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class ScaleConfig:
    num_workers: int = 1
    gpus_per_worker: float = 0.0  # 0 = CPU workers with gloo
    cpus_per_worker: float = 0.5  # fractional on small machines so decode tasks can run
    max_failures: int = 2  # worker failures to recover from (from the last checkpoint)
    precision: str = "auto"  # auto: bf16 autocast on GPUs, fp32 on CPUs; or bf16 | fp32 (clman/amp.py)
    compile: bool = False  # torch.compile the training model: 1.6-1.9x faster steps on an H100, ~1 min to compile
    # torch.compile's mode; auto: reduce-overhead (CUDA graphs) on GPUs, where the steps are bound by
    # the host's kernel launches, default on CPUs (clman/amp.py compile_mode)
    compile_mode: str = "auto"
    # Attached to a cluster: seconds to wait for the autoscaler to add what the workers need (a cold
    # GPU node takes 2-10 min); then fail naming what is missing. A Ray started here never waits.
    resource_timeout: float = 600.0

    def check(self, where: str) -> None:
        _at_least(where, "num_workers", self.num_workers, 1)
        _one_of(where, "precision", self.precision, PRECISIONS)
        _one_of(where, "compile_mode", self.compile_mode, COMPILE_MODES)
        _in_range(where, "gpus_per_worker", self.gpus_per_worker, 0.0, 16.0)
        _positive(where, "cpus_per_worker", self.cpus_per_worker)
        _at_least(where, "max_failures", self.max_failures, -1)
        _at_least(where, "resource_timeout", self.resource_timeout, 0.0)


@dataclass(frozen=True)
class PretrainConfig:
    """SimCLR pretraining of the frame encoder (paper 3.2, 4.3)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    epochs: int = 8192
    batch_size: int = 64  # global batch of frames (each gives two views)
    lr: float = 9e-3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coefficient: float = 0.001
    temperature: float = 0.5
    # The other frames of an anchor's video (M = data.frames_per_clip per video in a batch): negative (the
    # paper's SimCLR reading: 2(M-1) same-lesion keys among the negatives), mask (left out of the
    # denominator) or positive (extra positives, SupCon averaging). clman/losses.py has the formulas.
    same_video: str = "negative"
    warmup_epochs: int = 0
    checkpoint_every: int = 1  # epochs
    seed: int = 0

    def check(self, where: str = "pretrain") -> None:
        _at_least(where, "epochs", self.epochs, 1)
        _at_least(where, "batch_size", self.batch_size, 2)
        _positive(where, "lr", self.lr)
        _at_least(where, "weight_decay", self.weight_decay, 0.0)
        _in_range(where, "momentum", self.momentum, 0.0, 1.0)
        _positive(where, "trust_coefficient", self.trust_coefficient)
        _positive(where, "temperature", self.temperature)
        _one_of(where, "same_video", self.same_video, SAME_VIDEO)
        _at_least(where, "warmup_epochs", self.warmup_epochs, 0)
        _at_least(where, "checkpoint_every", self.checkpoint_every, 1)


OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("constant", "cosine")
CLASS_WEIGHTS = ("none", "balanced")


@dataclass(frozen=True)
class FinetuneConfig:
    """CLMAN: encoder + aggregator + linear classifier on T-frame clips (paper 3.3, 4.3).

    The defaults are the paper's recipe (SGD, constant lr 1e-4, the last epoch) plus a
    validation split carved from the training patients when the manifest has none;
    ``jobs/configs/demo-cpu.yaml`` holds a recipe measured to learn on two phantoms
    (docs/recipes.md).
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    scale: ScaleConfig = field(default_factory=ScaleConfig)
    epochs: int = 320
    batch_size: int = 8  # global batch of clips
    optimizer: str = "sgd"  # sgd (the paper's, with momentum) | adamw (decoupled weight decay)
    lr: float = 1e-4  # peak learning rate; 0 trains nothing (it checks the not-learning warning)
    schedule: str = "constant"  # constant (the paper's) | cosine: per-step cosine annealing to 0 after warmup
    warmup_epochs: int = 0  # linear warmup from lr / warmup_steps to lr, per step, with either schedule
    encoder_lr_scale: float = 1.0  # encoder lr = lr * this (1.0 = the paper: one lr; 0 freezes it)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4  # sgd: L2 added to the gradient; adamw: decoupled (try 0.01-0.05)
    grad_clip: float = 0.0  # max global gradient norm; 0 = off (1.0 tames the first AdamW steps)
    label_smoothing: float = 0.0  # cross-entropy target smoothing, 0-0.49 (0.1 keeps logits from running away)
    class_weights: str = "none"  # none | balanced: weights n / (2 n_class) from the training split's videos
    val_fraction: float = 0.2  # no val split in the manifest: this share of training patients validates; 0 = off
    # Train on this share of the labelled training patients (after the validation carve), per class, nested by
    # seed: the 0.1 subset is inside the 0.25 one (clman/train/finetune.py label_subset); 1 = all of them
    label_fraction: float = 1.0
    patience: int = 0  # stop after this many epochs without a better val score; 0 = run every epoch
    # The val score that picks the checkpoint (and patience waits on): the mean val AUC of the last
    # select_window epochs (1 = that epoch's val AUC). On 24-32 val videos one epoch's AUC spikes: the
    # 40-epoch demo recipe on the default phantom kept epoch 8 of 40 (held-out AUC 0.93) by it, epoch 28
    # (0.97) by a mean of 5 (docs/recipes.md).
    select_window: int = 1
    # How validation scores a video: evaluate.frames / evaluate.clips, copied here by job_config, so that
    # validation and test score the same clips of a video (clman/data/sampling.py scoring_clips). Set the
    # evaluate keys; a finetune value that differs from them fails.
    val_frames: str = "clips"
    val_clips: int = 4
    # evaluate.target_sensitivity, copied here likewise: model.pt stores the threshold that reaches it on the
    # kept epoch's validation videos (the operating point jobs.predict applies; never chosen on the test split)
    val_target_sensitivity: float = 0.95
    checkpoint_every: int = 1
    seed: int = 0  # also picks the carved validation patients and the label_fraction subset

    def check(self, where: str = "finetune") -> None:
        _at_least(where, "epochs", self.epochs, 1)
        _at_least(where, "batch_size", self.batch_size, 1)
        _one_of(where, "optimizer", self.optimizer, OPTIMIZERS)
        if not self.lr >= 0:  # 0 is allowed: a run that must trigger the not-learning warning
            raise ConfigError(
                f"{where}.lr: must be > 0 to learn (0 is accepted: a run that checks the "
                f"not-learning warning), got {self.lr!r}"
            )
        _one_of(where, "schedule", self.schedule, SCHEDULES)
        _in_range(where, "warmup_epochs", self.warmup_epochs, 0, self.epochs)
        _at_least(where, "encoder_lr_scale", self.encoder_lr_scale, 0.0)
        _in_range(where, "momentum", self.momentum, 0.0, 1.0)
        _at_least(where, "weight_decay", self.weight_decay, 0.0)
        _at_least(where, "grad_clip", self.grad_clip, 0.0)
        _in_range(where, "label_smoothing", self.label_smoothing, 0.0, 0.49)
        _one_of(where, "class_weights", self.class_weights, CLASS_WEIGHTS)
        _in_range(where, "val_fraction", self.val_fraction, 0.0, 0.9)
        if not 0.0 < self.label_fraction <= 1.0:
            raise ConfigError(
                f"{where}.label_fraction: must be in (0, 1] (1 = every labelled training patient), "
                f"got {self.label_fraction!r}"
            )
        _at_least(where, "patience", self.patience, 0)
        _at_least(where, "select_window", self.select_window, 1)
        _one_of(where, "val_frames", self.val_frames, EVAL_FRAMES)
        _at_least(where, "val_clips", self.val_clips, 1)
        _in_range(where, "val_target_sensitivity", self.val_target_sensitivity, 0.0, 1.0)
        check_scoring(self.val_frames, self.model.arch, self.data.num_frames)
        _at_least(where, "checkpoint_every", self.checkpoint_every, 1)


@dataclass(frozen=True)
class EvaluateConfig:
    """Frame size and T come from the checkpoint's own config: a model is scored as it was trained.

    ``frames`` / ``clips`` also decide how the finetune job validates (``FinetuneConfig.val_frames``):
    one scoring protocol for validation and test (clman/data/sampling.py).
    """

    # clips: a video's score is the mean P(malignant) of `clips` clips of T frames at fixed offsets in the
    # training segments (1 = the segment centres); all: one clip of every frame up to 512 (CLMAN only: a
    # Table 4 baseline would be tested at stride 1 after training at stride ~N/T)
    frames: str = "clips"
    # K clips per video: 4 covers each segment at 4 phases; K x the compute of one clip per video
    clips: int = 4
    threshold: float = 0.5
    target_sensitivity: float = 0.95
    bootstrap: int = 1000
    seed: int = 0

    def check(self, where: str = "evaluate") -> None:
        if self.frames == "clip":  # the name before "clips": T segment centres = clips with K = 1
            raise ConfigError(
                f"{where}.frames: 'clip' is now 'clips' with {where}.clips=1 (the T segment centres); "
                f"allowed: {list(EVAL_FRAMES)}"
            )
        _one_of(where, "frames", self.frames, EVAL_FRAMES)
        _at_least(where, "clips", self.clips, 1)
        _in_range(where, "threshold", self.threshold, 0.0, 1.0)
        _in_range(where, "target_sensitivity", self.target_sensitivity, 0.0, 1.0)
        _at_least(where, "bootstrap", self.bootstrap, 0)


JOB_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}
SUB_CONFIGS = {"model": ModelConfig, "data": DataConfig, "scale": ScaleConfig}


# ---------------------------------------------------------------- checks


def check_scoring(frames: str, arch: str, num_frames: int) -> None:
    """evaluate.frames=all only for CLMAN, whose aggregator takes any number of frames: a Table 4 baseline
    trained on T frames about N / T apart is scored on clips like those (evaluate.frames=clips)."""
    if frames == "all" and arch != "clman":
        raise ConfigError(
            f"evaluate.frames=all: model.arch={arch} is trained on clips of data.num_frames={num_frames} "
            "frames spread over the video and is scored on such clips; use evaluate.frames=clips "
            "('all', every frame at stride 1, is for CLMAN only)"
        )


def _one_of(where, key, value, allowed):
    if value not in allowed:
        raise ConfigError(f"{where}.{key}: {value!r} is not one of {list(allowed)}")


def _positive(where, key, value):
    if not value > 0:
        raise ConfigError(f"{where}.{key}: must be > 0, got {value!r}")


def _at_least(where, key, value, lo):
    if not value >= lo:  # NaN fails too (``_coerce`` refuses it before; this holds for code-built configs)
        raise ConfigError(f"{where}.{key}: must be >= {lo}, got {value!r}")


def _in_range(where, key, value, lo, hi):
    if not lo <= value <= hi:
        raise ConfigError(f"{where}.{key}: must be in [{lo}, {hi}], got {value!r}")


# ---------------------------------------------------------------- loading


def _coerce(where: str, key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp``; int -> float is the only widening."""
    origin = typing.get_origin(tp)
    name = f"{where}.{key}"
    if origin is typing.Union or origin is types.UnionType:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for tp_ in inner:  # the first member that takes the value (int | str: 4 or "auto")
            try:
                return _coerce(where, key, value, tp_)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(
            errors[0] if len(errors) == 1 else f"{name}: expected one of {[t.__name__ for t in inner]}, got {value!r}"
        )
    if origin is tuple:
        (item, _ell) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list of {item.__name__}, got {value!r}")
        return tuple(_coerce(where, f"{key}[]", v, item) for v in value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and not math.isfinite(_float_or(value, 0.0)):
            # YAML 1.1 reads 1e999 as a string: name the real problem, not the type
            raise ConfigError(f"{name}: must be a finite number, got {value}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float (10**400)
            raise ConfigError(
                f"{name}: must be a finite number, got an integer of {len(str(abs(value)))} digits"
            ) from None
        # NaN passes every range check (all comparisons are false) and inf breaks timeouts and
        # clipping silently: refused here, once, for every float key (YAML .nan/.inf, 1e999, --set).
        if not math.isfinite(value):
            raise ConfigError(f"{name}: must be a finite number, got {value!r}")
        return value
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads a bare off / on as a boolean: `data.cache: off`
            value = "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{name}: unsupported field type {tp!r}")


def _float_or(text: str, default: float) -> float:
    try:
        return float(text)
    except ValueError:
        return default


def build(cls, values: Mapping[str, Any] | None, where: str):
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and bad types."""
    values = dict(values or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}; allowed keys: {sorted(fields)}")
    kwargs = {}
    for key, value in values.items():
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}.{key}: expected a mapping, got {value!r}")
            kwargs[key] = build(tp, value, key)  # sub-configs are named by their section
        else:
            kwargs[key] = _coerce(where, key, value, tp)
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        check(where)
    return obj


def _parse_scalar(text: str) -> Any:
    """``--set`` values are YAML scalars or flow lists: 1e-4, true, [3, 4], mma."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; accept it as the number users mean.
        try:
            return float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            return value
    return value


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """Apply ``a.b=value`` overrides to a nested dict (a copy)."""
    tree = {k: dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. finetune.lr=1e-4")
        key, text = item.split("=", 1)
        set_dotted(tree, key.strip(), _parse_scalar(text.strip()))
    return tree


def set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) != 2:
        raise ConfigError(f"{key!r}: expected <section>.<field>, e.g. finetune.lr or model.mma_depth")
    section, name = parts
    allowed = sorted(set(SUB_CONFIGS) | set(JOB_CONFIGS))
    if section not in allowed:
        raise ConfigError(f"{key!r}: unknown section {section!r}; allowed: {allowed}")
    tree.setdefault(section, {})
    tree[section][name] = value


def _read_yaml(path: str) -> dict:
    from clman import storage

    try:
        text = storage.read_text(path)
    except storage.StorageError:
        raise
    try:
        tree = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(tree).__name__}")
    return tree


def load_tree(path: str | None, overrides=()) -> dict:
    """Read a preset and apply overrides; validate every section."""
    tree = _read_yaml(path) if path else {}
    allowed = sorted(set(SUB_CONFIGS) | set(JOB_CONFIGS))
    for section, values in tree.items():
        if section not in allowed:
            raise ConfigError(f"{path}: unknown section {section!r}; allowed: {allowed}")
        if not isinstance(values, Mapping):
            raise ConfigError(f"{path}: section {section!r} must be a mapping, got {values!r}")
    tree = apply_overrides(tree, list(overrides))
    # Validate every section now, so a typo in an unrelated section still fails early.
    for job in JOB_CONFIGS:
        job_config(tree, job)
    return tree


def job_config(tree: Mapping[str, Any], job: str):
    """The frozen config of ``job`` from a (validated or not) section tree."""
    if job not in JOB_CONFIGS:
        raise ConfigError(f"unknown job {job!r}; allowed: {sorted(JOB_CONFIGS)}")
    cls = JOB_CONFIGS[job]
    names = {f.name for f in dataclasses.fields(cls)}
    values = dict(tree.get(job) or {})
    for sub in SUB_CONFIGS:
        if sub in names and sub in tree:
            values[sub] = {**dict(tree[sub] or {}), **dict(values.get(sub) or {})}
    if job == "finetune":
        values = _scoring_of(tree, values)
    return build(cls, values, job)


def _scoring_of(tree: Mapping[str, Any], values: dict) -> dict:
    """finetune's ``values`` with val_frames / val_clips / val_target_sensitivity = the tree's evaluate.frames /
    clips / target_sensitivity: validation scores videos as the test does, and picks the deployed threshold at the
    sensitivity evaluate reports. A finetune value that differs fails, naming both keys."""
    ev = build(EvaluateConfig, tree.get("evaluate"), "evaluate")  # a bad evaluate key fails under its own name
    hints = typing.get_type_hints(FinetuneConfig)
    for mine, theirs in (
        ("val_frames", "frames"),
        ("val_clips", "clips"),
        ("val_target_sensitivity", "target_sensitivity"),
    ):
        value = getattr(ev, theirs)
        # a bad value is named as such (e.g. nan) before it is compared
        if mine in values and _coerce("finetune", mine, values[mine], hints[mine]) != value:
            raise ConfigError(
                f"finetune.{mine}={values[mine]!r} differs from evaluate.{theirs}={value!r}: validation "
                f"scores videos as evaluation does; set evaluate.{theirs} alone"
            )
        values[mine] = value
    return values


def load(job: str, path: str | None = None, overrides=()):
    """The config of ``job`` from a preset file plus ``--set`` overrides."""
    return job_config(load_tree(path, overrides), job)


def to_dict(cfg) -> dict:
    """Plain nested dict (lists for tuples): YAML/JSON- and checkpoint-safe."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def from_dict(job: str, values: Mapping[str, Any]):
    return build(JOB_CONFIGS[job], values, job)


def to_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
