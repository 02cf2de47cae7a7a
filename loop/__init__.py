"""calloop: a prompt-calibration loop for particle-physics detectors."""

__version__ = "0.1.0"
