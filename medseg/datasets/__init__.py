"""Datasets: the layouts medseg reads (MSD, nnU-Net, folder pairs, npz) and the
integrity check of ``medseg data check``."""
