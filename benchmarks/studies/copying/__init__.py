"""What pruning does to copying from context: induction_probe.py, copy_calibration.py."""
