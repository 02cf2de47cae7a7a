"""The finite-state machines of steps 2, 3 and 4, one module per step."""

STEPS = ("step2", "step3", "step4")
"""The daemons of one calibration, in data-flow order."""
