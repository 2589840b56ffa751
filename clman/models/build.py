"""Build the models of a job from its ``ModelConfig``: the one place that maps config to parts."""

from __future__ import annotations

import io
import warnings

import torch
from torch import nn

from clman.checkpoint import FORMAT, CheckpointError, _why, load_model_state
from clman.config import ARCHS, ModelConfig
from clman.models.aggregators import build_aggregator
from clman.models.baselines import TORCHVISION_3D, Video3D, torchvision_video
from clman.models.encoder import build_encoder
from clman.models.heads import LinearHead, ProjectionHead
from clman.models.p3d import P3DResNet
from clman.models.timesformer import TimeSformer
from clman.models.tin import tin
from clman.models.tsm import tsm
from clman.models.video import SimCLRModel, VideoClassifier

# Fields only CLMAN reads, and only TimeSformer reads: a baseline leaves them unused (ignored_fields).
CLMAN_FIELDS = (
    "norm",
    "nonlocal_stages",
    "width",
    "gn_groups",
    "aggregator",
    "mma_depth",
    "mma_bound",
    "proj_dim",
    "proj_layers",
)
TIMESFORMER_FIELDS = ("tf_dim", "tf_depth", "tf_heads", "tf_patch", "tf_size", "tf_frames")


def is_clman(cfg: ModelConfig) -> bool:
    """True for CLMAN (encoder + aggregator + head, SimCLR-pretrainable), False for a Table 4 baseline."""
    return cfg.arch == "clman"


def encoder_from(cfg: ModelConfig):
    return build_encoder(
        norm=cfg.norm, nonlocal_stages=tuple(cfg.nonlocal_stages), width=cfg.width, gn_groups=cfg.gn_groups
    )


def simclr_from(cfg: ModelConfig) -> SimCLRModel:
    if not is_clman(cfg):
        raise ValueError(
            f"model.arch={cfg.arch}: contrastive pretraining applies to CLMAN only; "
            "the baselines train from the data alone (finetune without --encoder)"
        )
    encoder = encoder_from(cfg)
    projector = ProjectionHead(encoder.out_dim, out_dim=cfg.proj_dim, num_layers=cfg.proj_layers)
    return SimCLRModel(encoder, projector)


def classifier_from(cfg: ModelConfig) -> nn.Module:
    """The clip classifier of ``cfg.arch``, randomly initialised (load ``cfg.weights`` with `load_weights`).

    Every arch: forward(clips (B, T, 3, H, W), mask (B, T) | None, return_weights=False) -> (B, 2)
    logits, or (logits, weights) with return_weights (weights None for the baselines). Only
    CLMAN has an ``.encoder``. A baseline warns once about the CLMAN / TimeSformer settings it leaves unused.
    """
    arch = cfg.arch
    unused = ignored_fields(cfg)
    if unused:
        warnings.warn(f"model.arch={arch} leaves these settings unused: {', '.join(unused)}", stacklevel=2)
    if arch == "clman":
        encoder = encoder_from(cfg)
        aggregator = build_aggregator(cfg.aggregator, encoder.out_dim, depth=cfg.mma_depth, mma_bound=cfg.mma_bound)
        return VideoClassifier(encoder, aggregator, LinearHead(encoder.out_dim, num_classes=2))
    elif arch in TORCHVISION_3D:
        return torchvision_video(arch)
    elif arch == "p3d":
        return Video3D(P3DResNet(), arch)
    elif arch == "timesformer":
        return TimeSformer(cfg.tf_dim, cfg.tf_depth, cfg.tf_heads, cfg.tf_patch, cfg.tf_size, cfg.tf_frames)
    elif arch in ("tsm_18", "tsm_50"):
        return tsm(int(arch.split("_")[1]))
    elif arch in ("tin_18", "tin_34", "tin_50"):
        return tin(int(arch.split("_")[1]))
    else:
        raise ValueError(f"model.arch must be one of {list(ARCHS)}, got {arch!r}")


def ignored_fields(cfg: ModelConfig) -> list[str]:
    """``model.<field>`` settings that differ from their defaults and that ``cfg.arch`` does not read."""
    default = ModelConfig()
    names = [] if is_clman(cfg) else list(CLMAN_FIELDS)
    if cfg.arch != "timesformer":
        names += TIMESFORMER_FIELDS
    return [f"model.{n}" for n in names if getattr(cfg, n) != getattr(default, n)]


def read_weights(uri: str) -> dict[str, torch.Tensor]:
    """The state dict in ``uri`` (local path or s3://): a plain state dict, or a clman checkpoint's "model".

    Read with torch.load(weights_only=True); never downloads from anywhere else. Errors are one
    CheckpointError line naming the URI.
    """
    if uri.startswith("s3://"):
        from clman import storage

        try:
            source = io.BytesIO(storage.read_bytes(uri))
        except storage.StorageNotFoundError:
            raise CheckpointError(f"weights not found: {uri}") from None
        except storage.StorageError as e:  # its message names the URI and the cause
            raise CheckpointError(f"cannot read weights {e}") from e
    else:
        source = uri[len("file://") :] if uri.startswith("file://") else uri
        try:
            open(source, "rb").close()
        except OSError:
            raise CheckpointError(f"weights not found: {uri}") from None
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign or damaged files
        why = _why(e)
        raise CheckpointError(f"{uri}: not loadable as weights (torch.load(weights_only=True) failed: {why})") from e
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        obj = obj.get("model")
    if not (isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        found = type(obj).__name__
        raise CheckpointError(f"{uri}: expected a state dict (name -> tensor) or a clman checkpoint, got {found}")
    return obj


def load_weights(model: nn.Module, uri: str) -> nn.Module:
    """Load ``model.weights`` into ``model`` strictly; any key or shape mismatch is one CheckpointError line."""
    return load_model_state(model, read_weights(uri), what=f"weights {uri}")


# Fields that decide the encoder's weights' shapes: a pretrained encoder must agree on them.
ENCODER_FIELDS = ("norm", "nonlocal_stages", "width", "gn_groups")
