"""The driver side of a run: what the process that starts Ray does before, around and after the workers.

    session.py     Ray start-up or attach (address checks), Ray's output to a file, the terminal given back
    resources.py   what a run or a trial needs of the cluster; waiting for the autoscaler
    trainer.py     the frames workers read; a TrainJob -> TorchTrainer -> fit -> the kept checkpoint; one-line errors
    progress.py    a run's epochs as a progress bar on the driver's terminal
    grid.py        the one Tune Tuner builder (sweeps and studies) and its callbacks
    ray_compat.py  every use of a Ray internal, one test each

The per-worker loops are in ``clman.train``; the sweep and study drivers (``clman.tune.driver``,
``clman.study.driver``) build on this package. Nothing is imported here: every Ray worker imports
``clman.launch.ray_compat`` (its setup hook) and with it this file, so it must stay empty.
"""
