"""Thin shim so that ``python train.py ...`` works from the repository root."""

from mcad.train import main

if __name__ == "__main__":
    main()
