"""`python -m accelctl` runs the command-line interface."""

from accelctl.cli import main

if __name__ == "__main__":
    main()
