"""Prediction jobs over many scans that lose nothing: inputs and shards, outputs, the
folder's settings record, claims between processes and crash recovery, the volumes
table and report, and the run loop (:func:`medseg.inference.jobs.run.segment_all`)."""
