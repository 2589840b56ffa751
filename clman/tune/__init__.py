"""Ray Tune sweeps of finetune or pretrain, one module per concern.

    space.py      search spaces: one flat YAML per sweep, checked against the job's config
    sweep.py      a sweep's arguments (saved as sweep.json) and the names the others share
    resources.py  how many trials the cluster holds at once
    driver.py     the trials and the Tuner: the only module here that imports Ray
    results.py    trials/epochs tables, best.yaml, summary.md, the plot

Nothing is imported here: ``import clman.tune.results`` does not start or import Ray.
"""
