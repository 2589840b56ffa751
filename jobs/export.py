"""Export a finetuned CLMAN classifier for serving: safetensors weights, an ONNX or TorchScript program.

    python -m jobs.export --model s3://bucket/runs/clman-v1/model.pt --out s3://bucket/deploy/clman-v1 [--format onnx]

Writes to ``--out`` (a folder or an s3:// URI): ``model.safetensors`` (the weights, the model
config in its metadata), ``model.onnx`` (``--format onnx``, the default; onnxruntime runs it) or
``model.ts`` (``--format torchscript``; ``torch.jit.load``), and ``deploy.json``: the threshold
model.pt stores (chosen on the validation videos for ``evaluate.target_sensitivity``; 0.5, said so,
for a model.pt without one) and the preprocessing. The program takes float32 clips
(B, T, 3, size, size) prepared as ``deploy.json``'s ``preprocessing`` says (uint8 frames / 255,
resized to ``size``, (x - mean) / std, grey repeated to 3 channels) and returns P(malignant) (B,);
a video's score is the mean over its K clips. Before writing, the program is checked to score
random clips as the checkpoint does (``max_abs_diff_vs_checkpoint`` in deploy.json). No cluster needed.
"""

from __future__ import annotations

import argparse

from clman import cli
from clman.export import FORMATS, check_format, export_model


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m jobs.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", required=True, help="model.pt written by jobs.finetune (path or s3:// URI)")
    p.add_argument("--out", required=True, help="output folder (path or s3:// URI)")
    p.add_argument(
        "--format",
        default="onnx",
        help=f"{' | '.join(FORMATS)} (default onnx: served by onnxruntime, TensorRT, Triton without "
        "PyTorch; torchscript needs libtorch, and PyTorch 2.14 warns that torch.jit is deprecated)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    check_format(args.format)  # before the checkpoint is read
    deploy = export_model(args.model, args.out, args.format)
    print(deploy["threshold_note"])
    for what, uri in deploy["files"].items():
        print(f"{what}: {uri}")
    return 0


if __name__ == "__main__":
    cli.run_main(main)
