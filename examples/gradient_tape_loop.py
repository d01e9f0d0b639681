"""A hand-written `tf.GradientTape` loop driving an `AsyncCallbackList`.

The loop of the guide "custom callbacks in a TensorFlow training loop",
with its logging and plateau callbacks, plus a checkpoint every epoch. The
list offloads the checkpoint by itself (`offload="auto"`) and runs the
logging callback in a worker; the plateau callback changes the learning
rate, so it stays inline.

Run: python examples/gradient_tape_loop.py
"""

import tempfile

import keras
import tensorflow as tf

from asynccb import AsyncCallback, AsyncCallbackList


class CustomLoggingCallback(keras.callbacks.Callback):
    def on_batch_end(self, batch, logs=None):
        if logs is None:
            return
        print(f"Batch {batch}: Loss = {logs.get('loss'):.4f}", end=" ")
        for metric_name in logs:
            if metric_name != "loss":
                print(f"{metric_name} = {logs.get(metric_name):.4f}", end=" ")
        print()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        print(f"Epoch {epoch}: Loss = {logs.get('loss'):.4f}", end=" ")
        for metric_name in logs:
            if metric_name != "loss":
                print(f"{metric_name} = {logs.get(metric_name):.4f}", end=" ")
        print()


class LearningRateSchedulerCallback(keras.callbacks.Callback):
    asynccb_control = True  # Changes the learning rate: stays inline.

    def __init__(self, optimizer, patience=2, factor=0.5):
        super().__init__()
        self.optimizer = optimizer  # The loop's optimizer, not model's.
        self.patience = patience
        self.factor = factor
        self.wait = 0
        self.best_val_loss = float("inf")

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        val_loss = logs.get("val_loss")
        if val_loss is None:
            return  # do not execute if there is not validation data
        if val_loss < self.best_val_loss:
            self.best_val_loss = val_loss
            self.wait = 0
        else:
            self.wait += 1
            if self.wait >= self.patience:
                old_lr = float(self.optimizer.learning_rate)
                new_lr = old_lr * self.factor
                self.optimizer.learning_rate = new_lr
                print(f"Epoch {epoch}: Learning rate reduced from "
                      f"{old_lr:.6f} to {new_lr:.6f}")
                self.wait = 0


def train_step(model, optimizer, loss_fn, x, y):
    with tf.GradientTape() as tape:
        y_pred = model(x, training=True)
        loss = loss_fn(y, y_pred)
    gradients = tape.gradient(loss, model.trainable_variables)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables))
    return loss


def manual_train_loop(model, optimizer, loss_fn, train_dataset, epochs, callbacks):
    history = {"loss": []}
    callbacks.on_train_begin()
    for epoch in range(epochs):
        callbacks.on_epoch_begin(epoch)
        epoch_loss = 0
        for step, (x_batch, y_batch) in enumerate(train_dataset):
            loss = train_step(model, optimizer, loss_fn, x_batch, y_batch)
            epoch_loss += loss
            callbacks.on_batch_end(step, {"loss": loss})
        epoch_loss /= len(train_dataset)
        history["loss"].append(float(epoch_loss))
        val_loss = loss_fn(train_labels, model(train_features))
        callbacks.on_epoch_end(epoch, {"loss": epoch_loss, "val_loss": val_loss})
    callbacks.on_train_end({"loss": epoch_loss})
    return history


train_features = tf.constant([[1.0], [2.0], [3.0], [4.0]])
train_labels = tf.constant([0.0, 0.0, 1.0, 1.0])


def main(epochs=5, directory=None):
    directory = directory or tempfile.mkdtemp(prefix="asynccb-tape-")
    model = keras.Sequential([keras.layers.Dense(1, activation="sigmoid")])
    optimizer = keras.optimizers.Adam(learning_rate=0.01)
    loss_fn = keras.losses.BinaryCrossentropy()
    train_data = tf.data.Dataset.from_tensor_slices(
        (train_features, train_labels)).batch(2)
    callbacks = AsyncCallbackList(
        [
            AsyncCallback(CustomLoggingCallback(), state="none"),
            LearningRateSchedulerCallback(optimizer),
            keras.callbacks.ModelCheckpoint(
                f"{directory}/epoch{{epoch:02d}}.weights.h5",
                save_weights_only=True),
        ],
        model=model,
    )
    history = manual_train_loop(model, optimizer, loss_fn, train_data, epochs,
                                callbacks)
    print(f"Checkpoints in {directory}")
    print(callbacks.stats())
    return history, directory


if __name__ == "__main__":
    main()
