"""What a feature map test measures on a candidate batch: accuracy and class shift.

Both testing modes turn every channel into a few candidate batches (gradient
mode: the alpha and 2*alpha perturbations; mask mode: the channel removed,
amplified and inverted) and score the model's predictions on each:

* accuracy: top-1 accuracy against the true labels (the published score);
* class shift: the largest share of the batch pushed into one wrong class.
  Disturbing an ordinary feature map scatters errors over many classes;
  disturbing a backdoor feature map tends to send them to the attack's target;
* sink: that class (-1 when no prediction went wrong), the class the shift went to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ChannelScores:
    """One layer's test results: ``[C, k]`` accuracies, class shifts and sinks, one column per candidate batch."""

    accuracy: np.ndarray
    shift: np.ndarray
    sink: np.ndarray

    @classmethod
    def empty(cls, channels: int, columns: int) -> ChannelScores:
        return cls(np.zeros((channels, columns)), np.zeros((channels, columns)),
                   np.full((channels, columns), -1, dtype=np.int64))

    def record(self, start: int, predictions: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        """Score ``[chunk, columns, N]`` predictions into rows ``start:start + chunk``."""
        rows = slice(start, start + len(predictions))
        for column in range(predictions.shape[1]):
            self.accuracy[rows, column], self.shift[rows, column], self.sink[rows, column] = \
                prediction_scores(predictions[:, column], labels, num_classes)


def prediction_scores(predictions: np.ndarray, labels: np.ndarray,
                      num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Accuracy, class shift and sink of ``[k, N]`` predictions (k candidate batches) against ``N`` labels.

    Class shift: ``max over classes j`` of the share of images with label != j
    predicted as j; sink: that ``j`` (the lowest on ties), -1 when nothing went wrong.
    """
    k, n = predictions.shape
    accuracy = (predictions == labels[None]).mean(axis=1)
    wrong = predictions != labels[None]
    counts = np.zeros((k, num_classes), dtype=np.int64)
    rows = np.repeat(np.arange(k), n)
    np.add.at(counts, (rows[wrong.ravel()], predictions.ravel()[wrong.ravel()]), 1)
    sink = np.where(counts.max(axis=1) > 0, counts.argmax(axis=1), -1)
    return accuracy, counts.max(axis=1) / n, sink
