"""Runnable examples; the first is the local consortium demo (`fedseek demo`)."""
