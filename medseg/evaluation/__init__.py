"""Evaluation: label maps scored against the truth (Dice, surface distances, lesion
counts), per case and summarised, and a classifier's scores."""
