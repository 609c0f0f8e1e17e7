"""MRF-EPI: sequence timing, the shared signal model, dictionary and matching."""
