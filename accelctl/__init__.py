"""accelctl: a command-line training accelerator for JAX.

Importing the package is cheap on purpose: nothing here imports jax, so `accelctl --help`
stays fast.
"""

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    # `accelctl.train(config, ...)` (the Python API) without importing jax at `import accelctl`.
    if name == "train":
        import accelctl.train

        return accelctl.train
    raise AttributeError(f"module 'accelctl' has no attribute {name!r}")
