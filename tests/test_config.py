"""Config loading: strict keys and types, overrides, presets, round trips."""

import pytest

from clman import config as C

PRESETS = ["jobs/configs/paper.yaml", "jobs/configs/demo-cpu.yaml"]


@pytest.mark.parametrize("preset", PRESETS)
def test_presets_load_for_every_job(preset):
    tree = C.load_tree(preset)
    for job in C.JOB_CONFIGS:
        cfg = C.job_config(tree, job)
        assert C.from_dict(job, C.to_dict(cfg)) == cfg


def test_paper_preset_holds_the_papers_numbers():
    pre = C.load("pretrain", "jobs/configs/paper.yaml")
    fin = C.load("finetune", "jobs/configs/paper.yaml")
    assert (pre.batch_size, pre.lr, pre.weight_decay, pre.epochs) == (64, 9e-3, 1e-6, 8192)
    assert (fin.batch_size, fin.lr, fin.momentum, fin.weight_decay, fin.epochs) == (8, 1e-4, 0.9, 5e-4, 320)
    assert fin.data.num_frames == 16 and fin.model.norm == "group" and fin.model.nonlocal_stages == (3, 4)


def test_defaults_are_the_papers_recipe():
    fin, pre = C.FinetuneConfig(), C.PretrainConfig()
    assert (fin.lr, fin.batch_size, fin.data.num_frames) == (1e-4, 8, 16)
    assert (pre.lr, pre.batch_size) == (9e-3, 64)


def test_overrides_apply_and_parse_numbers():
    cfg = C.load("finetune", None, ["finetune.lr=1e-3", "model.mma_depth=3", "model.nonlocal_stages=[]"])
    assert cfg.lr == 1e-3 and cfg.model.mma_depth == 3 and cfg.model.nonlocal_stages == ()


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.lrr=1", "finetune: unknown key 'lrr'"),
        ("model.aggregator=foo", "model.aggregator: 'foo' is not one of"),
        ("finetune.lr=abc", "finetune.lr: expected a number"),
        ("finetune.lr=-1", "finetune.lr: must be > 0"),
        ("finetune.epochs=2.5", "finetune.epochs: expected an integer"),
        ("model.nonlocal_stages=[2]", "model.nonlocal_stages[]: 2 is not one of"),
        ("nosection.x=1", "unknown section 'nosection'"),
        ("lr=1", "expected <section>.<field>"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        C.load("finetune", None, [override])


def test_typo_in_another_section_fails_early(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("finetune: {lr: 1.0e-3}\npretrain: {epocs: 3}\n")
    with pytest.raises(C.ConfigError, match="pretrain: unknown key 'epocs'"):
        C.load("finetune", str(p))


def test_unknown_section_and_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("trainer: {lr: 1}\n")
    with pytest.raises(C.ConfigError, match="unknown section 'trainer'"):
        C.load_tree(str(p))
    p.write_text("model: [unclosed\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_tree(str(p))
