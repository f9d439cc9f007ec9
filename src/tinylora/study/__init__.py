"""The study: sweeps of training runs from a TOML spec, their results table and plots."""
