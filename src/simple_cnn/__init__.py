"""simple_cnn: train a CNN on a folder of class folders, test it, classify new images.

The modes are plain functions, for notebooks as much as for the command line::

    from simple_cnn.train import TrainConfig, train
    from simple_cnn.evaluate import evaluate
    from simple_cnn.classify import classify
    from simple_cnn.dataset import load_data   # like keras.datasets.mnist.load_data()
"""

__version__ = "0.1.0"
