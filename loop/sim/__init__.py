"""The embedded simulated experiment: run registry, detector and scenario player."""
