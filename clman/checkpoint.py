"""One checkpoint format for every job: unwrapped weights + config + step.

A checkpoint is a dict of plain tensors and Python values written with
torch.save and read with torch.load(weights_only=True), so loading never runs
pickled code:

    format     "clman-ckpt/1"
    kind       "simclr" | "classifier" | "encoder"
    model      state dict of the unwrapped model (CPU tensors)
    config     dict of plain values (the resolved job config)
    step       int, epoch int
    optimizer  optimizer state dict, or None
    extra      dict of plain values (e.g. metrics at this step); a classifier's also holds what
               deploying it needs: "preprocessing" and, when it was validated, "threshold" (the
               operating point chosen on the validation videos; clman.evaluate.inference.choose_threshold)

Local paths are written to a temporary file in the same folder and renamed
(os.replace), so a crash never leaves a half-written checkpoint under the final
name; s3:// URIs go through clman.storage.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from torch import nn

FORMAT = "clman-ckpt/1"
KINDS = ("simclr", "classifier", "encoder")
_KEYS = ("format", "kind", "model", "config", "step", "epoch", "optimizer", "extra")


class CheckpointError(Exception):
    """A checkpoint is missing, is not a clman checkpoint, or does not fit the model (one line)."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def _local_path(uri: str) -> Path:
    return Path(uri[len("file://") :] if uri.startswith("file://") else uri)


def _check_plain(obj, where: str) -> None:
    """Reject values torch.load(weights_only=True) would refuse, naming where they sit."""
    # Exact types: numpy.float64 subclasses float but torch.save pickles it as a numpy global.
    if obj is None or type(obj) in (bool, int, float, str) or isinstance(obj, torch.Tensor):
        return
    if type(obj) in (list, tuple):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if type(k) not in (str, int):
                raise CheckpointError(f"checkpoint {where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}.{k}")
        return
    raise CheckpointError(
        f"checkpoint {where} is a {type(obj).__module__}.{type(obj).__name__}; only None, bool, int, float, str, "
        "tensors, lists, tuples and dicts can be saved (convert numpy values with .tolist() / float())"
    )


def save_checkpoint(
    path_or_uri: str | os.PathLike,
    model: nn.Module,
    *,
    kind: str,
    config: dict,
    step: int,
    epoch: int = 0,
    optimizer: torch.optim.Optimizer | None = None,
    extra: dict | None = None,
) -> None:
    """Write `model`'s weights (unwrapped, on CPU) with config and progress, atomically.

    Raises CheckpointError for a bad kind or a config/extra value that
    weights_only loading would refuse (before anything is written), and
    clman.storage.StorageError when an s3:// upload fails.
    """
    if kind not in KINDS:
        raise CheckpointError(f"checkpoint kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(config, dict):
        raise CheckpointError(f"checkpoint config must be a dict, got {type(config).__name__}")
    extra = {} if extra is None else extra
    if not isinstance(extra, dict):
        raise CheckpointError(f"checkpoint extra must be a dict, got {type(extra).__name__}")
    _check_plain(config, "config")
    _check_plain(extra, "extra")
    payload = {
        "format": FORMAT,
        "kind": kind,
        "model": {k: v.detach().cpu() for k, v in unwrap_model(model).state_dict().items()},
        "config": config,
        "step": int(step),
        "epoch": int(epoch),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra,
    }
    from clman import storage

    # One write path for files and S3: atomic, and a full disk is one line (storage.StorageError).
    buf = io.BytesIO()
    torch.save(payload, buf)
    storage.write_bytes(str(path_or_uri), buf.getvalue())


def _why(e: Exception) -> str:
    """One line on why torch.load failed: the unpickler's reason, not its advice to turn weights_only off."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:
        reason = text.split(marker, 1)[1]
        for stop in ("Please use", "Check the documentation"):
            reason = reason.split(stop, 1)[0]
        return f"{marker} {' '.join(reason.split()).rstrip('. ')}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def load_checkpoint(path_or_uri: str | os.PathLike) -> dict:
    """Read a checkpoint with torch.load(weights_only=True); tensors land on CPU."""
    uri = str(path_or_uri)
    if _is_s3(uri):
        from clman import storage

        try:
            source = io.BytesIO(storage.read_bytes(uri))
        except storage.StorageNotFoundError:
            raise CheckpointError(f"checkpoint not found: {uri}") from None
        except storage.StorageError as e:  # its message names the URI and the cause
            raise CheckpointError(f"cannot read checkpoint {e}") from e
    else:
        source = _local_path(uri)
        if not source.is_file():
            raise CheckpointError(f"checkpoint not found: {uri}")
    try:
        ckpt = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on foreign or damaged files
        raise CheckpointError(
            f"{uri} is not a clman checkpoint (torch.load(weights_only=True) failed: {_why(e)})"
        ) from e
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{uri} is not a clman checkpoint (format {found!r}, expected {FORMAT!r})")
    missing = [k for k in _KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{uri} is a damaged clman checkpoint: missing {', '.join(missing)}")
    if ckpt["kind"] not in KINDS:
        raise CheckpointError(f"{uri} has unknown kind {ckpt['kind']!r}; expected one of {', '.join(KINDS)}")
    return ckpt


def encoder_state_dict(ckpt: dict) -> dict[str, torch.Tensor]:
    """The encoder's weights from a simclr, classifier or encoder checkpoint ("encoder." stripped)."""
    kind, state = ckpt.get("kind"), ckpt.get("model")
    if kind == "encoder":
        return dict(state)
    if kind not in ("simclr", "classifier"):
        raise CheckpointError(
            f"cannot take an encoder from a checkpoint of kind {kind!r}; expected one of {', '.join(KINDS)}"
        )
    prefix = "encoder."
    out = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        raise CheckpointError(
            f"{kind} checkpoint has no keys starting with {prefix!r} (first keys: {', '.join(list(state)[:3])})"
        )
    return out


def load_model_state(model: nn.Module, ckpt_or_state: dict, what: str = "checkpoint") -> nn.Module:
    """Load strictly into `model` (unwrapped); any key or shape mismatch is one CheckpointError line.

    `ckpt_or_state` is a checkpoint from `load_checkpoint` (its "model" is used)
    or a bare state dict (e.g. from `encoder_state_dict`). `what` names the
    source in the error, e.g. "encoder checkpoint s3://runs/pretrain/last.pt".
    Returns the unwrapped model.
    """
    state = ckpt_or_state["model"] if ckpt_or_state.get("format") == FORMAT else ckpt_or_state
    target = unwrap_model(model)
    expected = target.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    for label, items in (
        ("missing keys", missing),
        ("unexpected keys", unexpected),
        ("shape mismatch (saved vs model)", wrong_shape),
    ):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{label} {', '.join(items[:3])}{more}")
    if problems:
        raise CheckpointError(f"{what} does not match this architecture: {'; '.join(problems)}")
    target.load_state_dict(state, strict=True)
    return target
