"""Small built-in tasks (data + model + training loop) that run offline, for demos and tests."""

from lowbit.zoo.digits import (
    DigitsCNN,
    DigitsData,
    evaluate,
    load_digits_split,
    torch_threads,
    train_classifier,
    train_digits_cnn,
)

__all__ = ["DigitsCNN", "DigitsData", "evaluate", "load_digits_split", "torch_threads",
           "train_classifier", "train_digits_cnn"]
