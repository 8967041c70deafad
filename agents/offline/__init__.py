"""Offline learning: datasets in Minari's format (dataset.py) and learners that read them."""
