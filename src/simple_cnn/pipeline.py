"""The tf.data pipeline that streams decoded uint8 images to Keras in float32 batches."""

from __future__ import annotations

import numpy as np

from .quiet import import_tensorflow

PIPELINE_DEPTH = 2  # batches gathered in parallel, and batches kept ready, by make_tf_dataset


def make_tf_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, shuffle: bool = False, seed: int = 0, in_graph=False):
    """Stream ``(x, y)`` to Keras in float32 batches with tf.data.

    The pipeline shuffles and batches *indices* and gathers each batch from the uint8
    array, so there is never a float32 copy of the dataset, and by default not even a
    second uint8 one: ``tf.numpy_function`` gathers straight from the NumPy array.
    ``in_graph=True`` slices a TensorFlow copy instead, for tf.distribute, whose
    multi-worker input pipelines cannot call Python functions.

    TensorFlow keeps the gather function, and so what it reads, after the dataset is
    gone (after training, the decoded images were still referenced from its closure):
    ``ds.release_arrays()`` lets the arrays go when the dataset will not be read again
    (training calls it after fitting).
    """
    tf = import_tensorflow()
    ds = tf.data.Dataset.from_tensor_slices((x, y)) if in_graph else tf.data.Dataset.range(len(x))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if in_graph:
        # uint8 batches, no map: the model casts its input. Under MultiWorkerMirroredStrategy
        # (TF 2.21, Keras 3.15) any map after batch fed wrong shapes from the second epoch on.
        ds.release_arrays = lambda: None  # the TensorFlow copy goes with the dataset
        return ds
    source = {"x": x, "y": y}
    y_type = tf.as_dtype(y.dtype)

    def gather(idx):
        xb, yb = tf.numpy_function(lambda i: (source["x"][i], source["y"][i]), [idx], (tf.uint8, y_type), stateful=False)
        xb.set_shape((None, *x.shape[1:]))
        yb.set_shape((None, *y.shape[1:]))  # class indices, or multi-label rows
        return tf.cast(xb, tf.float32), yb

    # Fixed parallelism and no tf.data.AUTOTUNE, which starts a tuning thread that sleeps
    # for doubling periods of up to a minute: deleting the training iterator waited for that
    # thread, so Keras' fit returned long after a run's last epoch (bench/README.md, "A
    # minute after the last epoch"). Two gathers in flight and two batches ready keep up
    # with the network (the benchmark's input-pipeline rows).
    options = tf.data.Options()
    options.autotune.enabled = False
    ds = ds.map(gather, num_parallel_calls=PIPELINE_DEPTH).prefetch(PIPELINE_DEPTH).with_options(options)
    ds.release_arrays = source.clear
    return ds
