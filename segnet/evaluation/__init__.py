"""Scoring a trained run on held-out volumes.

``evaluate.evaluate_run`` predicts every held-out case with ``segnet.inference``, restores each
prediction onto its scan's original grid, and scores it against the label there with
``segnet.metrics`` (millimetres from the original spacing). ``report`` writes ``metrics.json``,
``per_case.csv`` and the printed tables; ``montage`` draws a PNG per case.
"""
