"""The wiring layer: the only place that builds a running process from settings."""
