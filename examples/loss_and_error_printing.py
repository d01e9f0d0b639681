"""The guide's LossAndErrorPrintingCallback, offloaded to a worker thread.

Each print happens in a worker, from a private copy of `logs` taken when
Keras called the hook, so the numbers are exactly those of the guide's
synchronous version.

Run: python examples/loss_and_error_printing.py
"""

import keras
from guide_setup import get_model, load_data

from asynccb import AsyncCallback


class LossAndErrorPrintingCallback(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        print(
            "Up to batch {}, the average loss is {:7.2f}.".format(batch, logs["loss"])
        )

    def on_test_batch_end(self, batch, logs=None):
        print(
            "Up to batch {}, the average loss is {:7.2f}.".format(batch, logs["loss"])
        )

    def on_epoch_end(self, epoch, logs=None):
        print(
            "The average loss for epoch {} is {:7.2f} "
            "and mean absolute error is {:7.2f}.".format(
                epoch, logs["loss"], logs["mean_absolute_error"]
            )
        )


def main():
    (x_train, y_train), (x_test, y_test) = load_data()
    model = get_model()
    model.fit(
        x_train,
        y_train,
        batch_size=128,
        epochs=2,
        verbose=0,
        callbacks=[AsyncCallback(LossAndErrorPrintingCallback(), state="none")],
    )
    model.evaluate(
        x_test,
        y_test,
        batch_size=128,
        verbose=0,
        callbacks=[AsyncCallback(LossAndErrorPrintingCallback(), state="none")],
    )


if __name__ == "__main__":
    main()
