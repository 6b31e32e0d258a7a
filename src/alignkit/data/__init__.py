"""Data: demo pairs built from images shipped by installed packages (and, later, dataset loaders)."""
