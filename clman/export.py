"""A finetuned classifier as files a serving stack reads without clman: weights, a program, a JSON.

``export_model`` writes under one folder (a path or an s3:// URI):

    model.safetensors   the classifier's state dict (safetensors: no pickle); its metadata holds the
                        model config as JSON, so ``load_safetensors`` rebuilds the module
    model.onnx          (--format onnx) or ``model.ts`` (--format torchscript): float clips
                        (B, T, 3, size, size), preprocessed as ``deploy.json`` says, -> P(malignant) (B,)
    deploy.json         the threshold chosen on validation, the preprocessing, the program's input and
                        output, and the check below

The program is checked before anything is written: it scores random clips as the checkpoint
does (max |difference of P(malignant)| within ``TOLERANCE``), at two batch sizes (and two clip
lengths where T is dynamic), else the export fails in one line.

Facts that shaped this module
- torch 2.14's default ONNX exporter (``dynamo=True``, torch.export) fails on the aggregators'
  mask check (``clman/models/aggregators.py`` check_mask: a data-dependent ``nonzero``); the
  TorchScript-based exporter (``dynamo=False``) traces it in ~1 s for the 32 px test model and
  onnxruntime 1.32 matches PyTorch to ~2e-7 in P(malignant), the batch axis dynamic. Tracing
  freezes the model's Python shape checks (the TracerWarnings silenced below).
- T is dynamic only for ``frames=all`` models (a clip is the whole video): CLMAN's mma traced with
  a dynamic frame axis matched PyTorch at T = 1, 4 and 7; a ``frames=clips`` model always sees T.
"""

from __future__ import annotations

import io
import json
import logging
import warnings

import numpy as np
import torch

from clman import checkpoint as ckpt
from clman import config as C
from clman import storage
from clman.evaluate import inference
from clman.errors import JobError

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
FILES = {"onnx": "model.onnx", "torchscript": "model.ts"}
WEIGHTS = "model.safetensors"
DEPLOY = "deploy.json"
OPSET = 17
TOLERANCE = 1e-4  # max |P(malignant) difference| between the program and the checkpoint, float32 on CPU


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise C.ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def safetensors_bytes(model: torch.nn.Module, config: dict) -> bytes:
    """The unwrapped model's weights as safetensors bytes; ``config`` (the finetune config) in its metadata."""
    from safetensors.torch import save

    # clone: safetensors refuses tensors sharing storage, and views of a larger one
    state = {k: v.detach().cpu().contiguous().clone() for k, v in ckpt.unwrap_model(model).state_dict().items()}
    return save(state, metadata={"format": "clman-safetensors/1", "config": json.dumps(config)})


def safetensors_metadata(data: bytes) -> dict:
    """The ``__metadata__`` of safetensors bytes: the format is an 8-byte little-endian header length,
    then that many bytes of JSON header."""
    n = int.from_bytes(data[:8], "little")
    return dict(json.loads(data[8 : 8 + n]).get("__metadata__") or {})


def load_safetensors(data: bytes, where: str = "safetensors") -> torch.nn.Module:
    """A fresh classifier (eval mode, CPU) with the weights of :func:`safetensors_bytes`, loaded strictly."""
    from safetensors.torch import load

    from clman.models.build import classifier_from

    meta = safetensors_metadata(data)
    if "config" not in meta:
        raise ckpt.CheckpointError(f"{where}: no clman config in its metadata (not written by jobs.export)")
    model = classifier_from(C.from_dict("finetune", json.loads(meta["config"])).model)
    ckpt.load_model_state(model, load(data), what=where)
    return model.eval()


def program_bytes(module: torch.nn.Module, example: torch.Tensor, fmt: str, dynamic_frames: bool) -> bytes:
    """``module`` (float clips -> P(malignant)) traced on ``example`` as ONNX or TorchScript bytes."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # The tracer's warnings are about the model's own shape checks, frozen by design; the legacy ONNX
        # exporter's deprecation: the dynamo one cannot export the mask check (module docstring).
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*legacy TorchScript-based ONNX export.*")
        if fmt == "onnx":
            axes = {0: "batch", 1: "frames"} if dynamic_frames else {0: "batch"}
            torch.onnx.export(
                module,
                (example,),
                buf,
                dynamo=False,
                opset_version=OPSET,
                input_names=["clips"],
                output_names=["p_malignant"],
                dynamic_axes={"clips": axes, "p_malignant": {0: "batch"}},
            )
        elif fmt == "torchscript":
            torch.jit.save(torch.jit.trace(module, (example,), check_trace=False), buf)
        else:
            raise C.ConfigError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    return buf.getvalue()


def run_program(data: bytes, fmt: str, clips: torch.Tensor) -> np.ndarray:
    """P(malignant) (B,) of float clips (B, T, 3, size, size) from an exported program's bytes."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run(["p_malignant"], {"clips": clips.numpy().astype(np.float32)})[0]
    program = torch.jit.load(io.BytesIO(data), map_location="cpu")
    with torch.no_grad():
        return program(clips).numpy()


def check_program(data: bytes, fmt: str, module: torch.nn.Module, shapes) -> float:
    """Max |P(malignant) difference| of the program and ``module`` on seeded random clips of ``shapes``;
    a JobError when it exceeds ``TOLERANCE``."""
    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for shape in shapes:
        clips = torch.randn(shape, generator=gen)
        with torch.no_grad():
            want = module(clips).numpy()
        worst = max(worst, float(np.abs(run_program(data, fmt, clips) - want).max()))
    if not worst <= TOLERANCE:
        raise JobError(
            f"export: the {fmt} program scores clips {worst:.2e} away from the checkpoint "
            f"(tolerance {TOLERANCE:g}); not written"
        )
    return worst


def export_model(model_uri: str, out: str, fmt: str = "onnx") -> dict:
    """Write the weights, the program and ``deploy.json`` of the classifier at ``model_uri`` under ``out``;
    returns what ``deploy.json`` holds (with ``files``: the URIs written)."""
    check_format(fmt)
    state = ckpt.load_checkpoint(model_uri)
    model, cfg = inference.load_classifier(model_uri, "cpu", state=state)
    prep, stored = inference.stored_preprocessing(state), inference.stored_threshold(state)
    module = inference.ClipProbability(model).eval()
    t, size = prep["num_frames"], prep["size"]
    dynamic = prep["frames"] == "all"
    gen = torch.Generator().manual_seed(0)
    program = program_bytes(module, torch.randn((2, t, 3, size, size), generator=gen), fmt, dynamic)
    shapes = [(1, t, 3, size, size), (3, t, 3, size, size)] + ([(2, t + 3, 3, size, size)] if dynamic else [])
    worst = check_program(program, fmt, module, shapes)
    weights = safetensors_bytes(model, C.to_dict(cfg))
    files = {
        "program": storage.join(out, FILES[fmt]),
        "weights": storage.join(out, WEIGHTS),
        "deploy": storage.join(out, DEPLOY),
    }
    deploy = {
        "threshold": stored or {"value": inference.DEFAULT_THRESHOLD, "chosen_on": None},
        "threshold_note": inference.describe_threshold(stored),
        "preprocessing": prep,
        "program": {
            "file": FILES[fmt],
            "format": fmt,
            "opset": OPSET if fmt == "onnx" else None,
            "input": {
                "name": "clips",
                "dtype": "float32",
                "shape": ["batch", "frames" if dynamic else t, 3, size, size],
            },
            "output": {"name": "p_malignant", "dtype": "float32", "shape": ["batch"]},
            "max_abs_diff_vs_checkpoint": worst,
        },
        "weights": {"file": WEIGHTS, "tensors": len(model.state_dict())},
        "config": C.to_dict(cfg),
    }
    storage.write_bytes(files["weights"], weights)
    storage.write_bytes(files["program"], program)
    storage.write_text(files["deploy"], json.dumps(deploy, indent=2) + "\n")  # last: the export is complete
    log.info("exported %s as %s to %s (max |dP| %.1e vs the checkpoint)", model_uri, fmt, out, worst)
    return deploy | {"files": files}
