"""The finite-state machines of steps 2, 3 and 4, one module per step."""
