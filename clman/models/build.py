"""Build the models of a job from its ``ModelConfig``: the one place that maps config to parts."""

from __future__ import annotations

from clman.config import ModelConfig
from clman.models.aggregators import build_aggregator
from clman.models.encoder import build_encoder
from clman.models.heads import LinearHead, ProjectionHead
from clman.models.video import SimCLRModel, VideoClassifier


def encoder_from(cfg: ModelConfig):
    return build_encoder(
        norm=cfg.norm, nonlocal_stages=tuple(cfg.nonlocal_stages), width=cfg.width, gn_groups=cfg.gn_groups
    )


def simclr_from(cfg: ModelConfig) -> SimCLRModel:
    encoder = encoder_from(cfg)
    projector = ProjectionHead(encoder.out_dim, out_dim=cfg.proj_dim, num_layers=cfg.proj_layers)
    return SimCLRModel(encoder, projector)


def classifier_from(cfg: ModelConfig) -> VideoClassifier:
    encoder = encoder_from(cfg)
    aggregator = build_aggregator(cfg.aggregator, encoder.out_dim, depth=cfg.mma_depth)
    return VideoClassifier(encoder, aggregator, LinearHead(encoder.out_dim, num_classes=2))


# Fields that decide the encoder's weights' shapes: a pretrained encoder must agree on them.
ENCODER_FIELDS = ("norm", "nonlocal_stages", "width", "gn_groups")
