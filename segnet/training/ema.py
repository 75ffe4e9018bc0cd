"""Weight averaging (``train.ema_decay``): an exponential moving average of the weights.

After every optimizer step each average moves towards its weight::

    d = min(decay, (1 + t) / (10 + t))    t: the optimizer's updates so far (1 after the first)
    average <- average - (1 - d) * (average - weight)

The averages start as copies of the weights. The warm-up ``(1 + t) / (10 + t)`` is the
``num_updates`` rule of ``tf.train.ExponentialMovingAverage``: without it the averages would
hold on to the random initial weights for about ``1 / (1 - decay)`` steps (1000 at 0.999).

What is averaged: the trainable variables, in float32 whatever the compute precision. The
non-trainable ones are the live model's: BatchNorm's moving statistics are already a running
average (of batch statistics), which a second average would only delay, and the dropout seed
states are not numbers to average. Keras's optimizer ``use_ema`` draws the same line.

Why not that ``use_ema``: it keeps the averages as anonymous optimizer variables (saved as
``optimizer/_variables/<index>``, the index depending on the optimizer's other slots, and under
``inner_optimizer`` in float16), so inference could not name them; and it has no warm-up.

Where they live: the averages are created under the distribution strategy's scope, so they are
mirrored like the weights; the compiled step updates every device's copy from that device's
weights after the optimizer's update (:mod:`segnet.training.step`), and every checkpoint holds
them (:func:`segnet.checkpoint_files.average_objects`), so a resumed run continues them bit for
bit. Validation swaps them into the model and the live weights back afterwards, unchanged;
when training ends they are written into the model for good, which is then exported.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras
import numpy as np
import tensorflow as tf


class WeightAverage:
    """The averages of a model's trainable variables.

    Create it under ``strategy.scope()`` after the model is built.

    Args:
        model: the model whose ``trainable_variables`` are averaged (in that order).
        decay: the decay once warmed up, in (0, 1), e.g. 0.999.
    """

    def __init__(self, model: keras.Model, decay: float) -> None:
        self.variables = list(model.trainable_variables)
        self.decay = float(decay)
        self.averages = [
            tf.Variable(tf.cast(v.value, tf.float32), trainable=False, name="ema")
            for v in self.variables
        ]

    def update(self, strategy: tf.distribute.Strategy, updates: Any) -> None:
        """Moves every average towards its weight; in the cross-replica context of a step.

        Args:
            strategy: the strategy the variables were created under.
            updates: the optimizer's update count, this update included (``t`` above).
        """
        t = tf.cast(updates, tf.float32)
        decay = tf.minimum(tf.constant(self.decay, tf.float32), (1.0 + t) / (10.0 + t))
        for average, variable in zip(self.averages, self.variables):
            # On each device, that device's copy of the weight (all copies are equal).
            strategy.extended.update(average, _blend, args=(variable, decay))

    def reset(self) -> None:
        """The averages become the current weights (after weights were copied in)."""
        for average, variable in zip(self.averages, self.variables):
            average.assign(tf.cast(variable.value, tf.float32))

    def copy_to_model(self) -> None:
        """Writes the averages into the model's weights."""
        for variable, average in zip(self.variables, self.averages):
            variable.assign(tf.cast(average, variable.dtype))

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The model holds the averages inside the block, and its own weights again after it,
        bit for bit (so validating with the averages leaves training unchanged)."""
        live = [np.array(v.numpy()) for v in self.variables]
        self.copy_to_model()
        try:
            yield
        finally:
            for variable, value in zip(self.variables, live):
                variable.assign(value)


def _blend(average: tf.Variable, weight: Any, decay: tf.Tensor) -> Any:
    return average.assign_sub((1.0 - decay) * (average - tf.cast(weight, tf.float32)))
