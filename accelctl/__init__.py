"""accelctl: a command-line training accelerator for JAX.

Importing the package is cheap on purpose: nothing here imports jax, so `accelctl --help`
stays fast.
"""

__version__ = "0.1.0"
