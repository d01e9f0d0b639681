"""The setup of Keras' "Writing your own callbacks" guide, on synthetic data.

The guide loads MNIST from the internet; these examples use random data of
the same shapes (784 features, labels 0..9) so they run anywhere.
"""

import keras
import numpy as np


def get_model():
    """The guide's model: one Dense unit on 784 inputs, RMSprop, MSE."""
    model = keras.Sequential()
    model.add(keras.Input((784,)))
    model.add(keras.layers.Dense(1))
    model.compile(
        optimizer=keras.optimizers.RMSprop(learning_rate=0.1),
        loss="mean_squared_error",
        metrics=["mean_absolute_error"],
    )
    return model


def load_data(samples=1000, seed=0):
    """Synthetic stand-in for the guide's MNIST slice: `samples` rows of
    784 features in [0, 1) and labels 0..9 as float targets."""
    rng = np.random.default_rng(seed)
    x_train = rng.random((samples, 784), dtype=np.float32)
    y_train = rng.integers(0, 10, samples).astype("float32")
    x_test = rng.random((samples, 784), dtype=np.float32)
    y_test = rng.integers(0, 10, samples).astype("float32")
    return (x_train, y_train), (x_test, y_test)
