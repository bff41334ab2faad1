"""Bundled sample data: a CDP configuration and a generator of realistic customer events."""
