"""CLMAN models: ResNet-18 (+GN, +non-local) frame encoder, frame aggregators, heads, whole models,
and the paper's Table 4 baselines (built by name in clman.models.build.classifier_from)."""

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
from clman.models.baselines import Video3D
from clman.models.encoder import NONLOCAL_STAGES, NORMS, FrameEncoder, NonLocalBlock, build_encoder
from clman.models.heads import LinearHead, ProjectionHead
from clman.models.p3d import P3DResNet
from clman.models.timesformer import TimeSformer
from clman.models.tin import TemporalInterlace
from clman.models.tsm import FrameResNet, TemporalShift
from clman.models.video import SimCLRModel, VideoClassifier

__all__ = [
    "AGGREGATORS",
    "EMSAPool",
    "ExternalAttentionPool",
    "FrameEncoder",
    "FrameResNet",
    "LSTMAggregator",
    "LinearHead",
    "MaxPool",
    "MeanPool",
    "MultiMetaAttention",
    "NONLOCAL_STAGES",
    "NORMS",
    "NonLocalBlock",
    "P3DResNet",
    "ProjectionHead",
    "SelfAttentionPool",
    "SimCLRModel",
    "TemporalInterlace",
    "TemporalShift",
    "TimeSformer",
    "Video3D",
    "VideoClassifier",
    "build_aggregator",
    "build_encoder",
]
