import pytest
import torch
import torch.nn.functional as F

from clman import amp
from clman import config as C
from clman.models.build import classifier_from


def test_auto_is_fp32_on_cpu():
    assert amp.resolve("auto", "cpu") == "fp32"
    assert amp.resolve("bf16", "cpu") == "bf16"  # allowed: how CI runs the bf16 path
    assert amp.resolve("fp32", torch.device("cpu")) == "fp32"


def test_unknown_precision_is_refused():
    with pytest.raises(ValueError, match="fp16"):
        amp.resolve("fp16", "cpu")
    with pytest.raises(C.ConfigError, match=r"scale\.precision: 'fp16'"):
        C.load("finetune", None, ["scale.precision=fp16"])


def test_bf16_step_keeps_fp32_weights_and_matches_fp32():
    torch.manual_seed(0)
    cfg = C.load("finetune", None, ["model.width=0.125", "model.gn_groups=4"]).model
    model = classifier_from(cfg)
    clips = torch.randn(2, 3, 3, 32, 32)
    mask = torch.ones(2, 3, dtype=torch.bool)
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        ref = model(clips, mask)
    with amp.autocast("bf16", "cpu"):
        logits = model(clips, mask).float()
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, ref, atol=0.05, rtol=0.05)  # bf16 keeps ~3 significant digits
    F.cross_entropy(logits, labels).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_fp32_context_changes_nothing():
    x = torch.randn(4, 4)
    with amp.autocast("fp32", "cpu"):
        assert (x @ x).dtype == torch.float32


def test_compile_mode_auto_is_cuda_graphs_on_gpus_only():
    assert amp.compile_mode("auto", "cpu") == "default"
    assert amp.compile_mode("auto", torch.device("cuda")) == "reduce-overhead"  # no GPU needed to name one
    assert amp.compile_mode("max-autotune", "cuda") == "max-autotune"
    assert C.load("finetune", None, []).scale.compile_mode == "auto"
    with pytest.raises(C.ConfigError, match=r"scale\.compile_mode: 'fast'.*reduce-overhead"):
        C.load("finetune", None, ["scale.compile_mode=fast"])
