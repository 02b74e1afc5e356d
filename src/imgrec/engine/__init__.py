"""Training machinery: the loop, checkpoints, run folders and the compute set-up. Never names a data set."""
