"""CLMAN models: ResNet-18 (+GN, +non-local) frame encoder, frame aggregators, heads, whole models."""

from clman.models.aggregators import (
    AGGREGATORS,
    EMSAPool,
    ExternalAttentionPool,
    LSTMAggregator,
    MaxPool,
    MeanPool,
    MultiMetaAttention,
    SelfAttentionPool,
    build_aggregator,
)
from clman.models.encoder import NONLOCAL_STAGES, NORMS, FrameEncoder, NonLocalBlock, build_encoder
from clman.models.heads import LinearHead, ProjectionHead
from clman.models.video import SimCLRModel, VideoClassifier

__all__ = [
    "AGGREGATORS",
    "EMSAPool",
    "ExternalAttentionPool",
    "FrameEncoder",
    "LSTMAggregator",
    "LinearHead",
    "MaxPool",
    "MeanPool",
    "MultiMetaAttention",
    "NONLOCAL_STAGES",
    "NORMS",
    "NonLocalBlock",
    "ProjectionHead",
    "SelfAttentionPool",
    "SimCLRModel",
    "VideoClassifier",
    "build_aggregator",
    "build_encoder",
]
