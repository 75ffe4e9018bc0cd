"""Training: the loop, losses' companions, checkpoints that resume exactly, distribution, logs.

``segnet.training.trainer.train(config)`` is the entry point (``segnet-train`` calls it). The
modules, in the order the loop uses them:

* ``distribute``: the ``tf.distribute`` strategy and this worker's role (chief or not).
* ``optimizers``: SGD/AdamW, the warm-up + poly/cosine schedule, global-norm clipping.
* ``step``: the compiled, replicated training step.
* ``checkpoints``: save, verify, restore (with fallback past a corrupt newest checkpoint).
* ``preemption``: SIGINT/SIGTERM become a save-and-stop at the next step boundary.
* ``validation``: sliding-window inference on whole held-out volumes, per-class Dice.
* ``progress``: progress bars, the epoch log line, metrics.csv, TensorBoard.
* ``progress_plot``: ``progress.png``, the run's curves drawn from metrics.csv.
* ``export``: ``model.keras`` and a SavedModel that loads without segnet.
"""
