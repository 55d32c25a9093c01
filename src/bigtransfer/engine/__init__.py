"""What every training run shares: device and precision, resumable state, metrics logs, plots."""
