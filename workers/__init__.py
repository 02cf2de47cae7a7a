"""Job payloads (reco, alca, harvest), calibration algorithms and job backends."""
