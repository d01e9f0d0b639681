"""A prediction sanity check, offloaded: `self.model.predict` each epoch.

The check runs the model on a fixed batch at every epoch end and reports
how many predictions changed class. Offloaded, it runs on a shadow model
holding the weights of the epoch that just ended, while training goes on:
the numbers are those of a synchronous check, and the training thread does
not pay for the forward pass.

Run: python examples/prediction_sanity_check.py
"""

import keras
import numpy as np

from asynccb import AsyncCallback


class PredictionSanityCheck(keras.callbacks.Callback):
    """Predicts fixed samples every epoch and reports how they change.

    Args:
        samples: Inputs to predict on, the same every epoch.
    """

    def __init__(self, samples):
        super().__init__()
        self.samples = samples
        self.previous = None
        self.reports = []

    def on_epoch_end(self, epoch, logs=None):
        classes = np.argmax(self.model.predict(self.samples, verbose=0), axis=-1)
        changed = 0 if self.previous is None else int(
            np.sum(classes != self.previous))
        if not np.isfinite(self.model.predict(self.samples[:1], verbose=0)).all():
            raise FloatingPointError(f"non-finite predictions at epoch {epoch}")
        self.previous = classes
        self.reports.append((epoch, changed))
        print(f"Epoch {epoch}: {changed} of {len(classes)} sample "
              "predictions changed class")


def main(epochs=4, samples=2048):
    rng = np.random.default_rng(0)
    x = rng.random((samples, 784), dtype=np.float32)
    y = rng.integers(0, 10, samples)
    model = keras.Sequential([
        keras.Input((784,)),
        keras.layers.Dense(128, activation="relu"),
        keras.layers.Dense(10),
    ])
    model.compile(
        optimizer="adam",
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    check = PredictionSanityCheck(x[:256])
    # The check needs the weights only, not the optimizer state.
    model.fit(x, y, epochs=epochs, batch_size=64, verbose=0,
              callbacks=[AsyncCallback(check, state="weights")])
    return check


if __name__ == "__main__":
    main()
