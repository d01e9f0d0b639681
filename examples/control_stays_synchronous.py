"""Control callbacks stay on the training thread; logging goes to a worker.

The guide's EarlyStoppingAtMinLoss sets `model.stop_training` and restores
weights; its CustomLearningRateScheduler sets the optimizer's learning
rate. Both must act on the live model at the very hook Keras calls them,
so they run inline, exactly as in plain Keras (`asynccb_control = True`
says so explicitly: wrapping them in AsyncCallback would be an error). The
LossAndErrorPrintingCallback beside them only reads `logs`, so it runs in
a worker.

Run: python examples/control_stays_synchronous.py
"""

import keras
import numpy as np
from guide_setup import get_model, load_data
from loss_and_error_printing import LossAndErrorPrintingCallback

from asynccb import AsyncCallback, AsyncCallbackList


class EarlyStoppingAtMinLoss(keras.callbacks.Callback):
    """Stop training when the loss is at its min, i.e. the loss stops decreasing.

    Arguments:
        patience: Number of epochs to wait after min has been hit. After this
        number of no improvement, training stops.
    """

    asynccb_control = True  # Sets model.stop_training and the weights.

    def __init__(self, patience=0):
        super().__init__()
        self.patience = patience
        # best_weights to store the weights at which the minimum loss occurs.
        self.best_weights = None

    def on_train_begin(self, logs=None):
        # The number of epoch it has waited when loss is no longer minimum.
        self.wait = 0
        # The epoch the training stops at.
        self.stopped_epoch = 0
        # Initialize the best as infinity.
        self.best = np.inf

    def on_epoch_end(self, epoch, logs=None):
        current = logs.get("loss")
        if np.less(current, self.best):
            self.best = current
            self.wait = 0
            # Record the best weights if current results is better (less).
            self.best_weights = self.model.get_weights()
        else:
            self.wait += 1
            if self.wait >= self.patience:
                self.stopped_epoch = epoch
                self.model.stop_training = True
                print("Restoring model weights from the end of the best epoch.")
                self.model.set_weights(self.best_weights)

    def on_train_end(self, logs=None):
        if self.stopped_epoch > 0:
            print(f"Epoch {self.stopped_epoch + 1}: early stopping")


class CustomLearningRateScheduler(keras.callbacks.Callback):
    """Learning rate scheduler which sets the learning rate according to schedule.

    Arguments:
        schedule: a function that takes an epoch index
            (integer, indexed from 0) and current learning rate
            as inputs and returns a new learning rate as output (float).
    """

    asynccb_control = True  # Sets the optimizer's learning rate.

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule

    def on_epoch_begin(self, epoch, logs=None):
        if not hasattr(self.model.optimizer, "learning_rate"):
            raise ValueError('Optimizer must have a "learning_rate" attribute.')
        # Get the current learning rate from model's optimizer.
        lr = self.model.optimizer.learning_rate
        # Call schedule function to get the scheduled learning rate.
        scheduled_lr = self.schedule(epoch, lr)
        # Set the value back to the optimizer before this epoch starts
        self.model.optimizer.learning_rate = scheduled_lr
        print(f"\nEpoch {epoch}: Learning rate is {float(np.array(scheduled_lr))}.")


LR_SCHEDULE = [
    # (epoch to start, learning rate) tuples
    (3, 0.05),
    (6, 0.01),
    (9, 0.005),
    (12, 0.001),
]


def lr_schedule(epoch, lr):
    """Helper function to retrieve the scheduled learning rate based on epoch."""
    if epoch < LR_SCHEDULE[0][0] or epoch > LR_SCHEDULE[-1][0]:
        return lr
    for i in range(len(LR_SCHEDULE)):
        if epoch == LR_SCHEDULE[i][0]:
            return LR_SCHEDULE[i][1]
    return lr


def main(epochs=15):
    (x_train, y_train), _ = load_data()

    print("== Early stopping inline, loss printing in a worker ==")
    model = get_model()
    stopper = EarlyStoppingAtMinLoss()
    model.fit(
        x_train,
        y_train,
        batch_size=64,
        epochs=30,
        verbose=0,
        callbacks=[AsyncCallback(LossAndErrorPrintingCallback(), state="none"),
                   stopper],
    )

    print("== Learning-rate schedule inline, in an AsyncCallbackList ==")
    model = get_model()
    callbacks = AsyncCallbackList(
        [AsyncCallback(LossAndErrorPrintingCallback(), state="none"),
         CustomLearningRateScheduler(lr_schedule)],
        add_history=True, model=model,
    )
    model.fit(x_train, y_train, batch_size=64, epochs=epochs, verbose=0,
              callbacks=callbacks)
    print(f"Final learning rate: {float(model.optimizer.learning_rate):.4f}")
    return stopper, model


if __name__ == "__main__":
    main()
