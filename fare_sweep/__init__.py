"""`fare sweep`: a resumable grid of compression cells, run locally or on Ray."""
