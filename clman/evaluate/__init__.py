"""Scoring a trained classifier and what is reported about it.

    inference.py    a classifier applied to frames or clips; the threshold and preprocessing model.pt stores (no Ray)
    scoring.py      a manifest split scored as Ray Data batch inference (jobs.evaluate, the demo, the study)
    report.py       metrics with patient-bootstrap CIs, predictions table, ROC and reliability plots, report.md
    calibration.py  Brier score, expected calibration error, reliability bins

Nothing is imported here: ``clman.evaluate.report`` and ``.calibration`` import without Ray or a model.
"""
