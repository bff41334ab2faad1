"""One suite of cases run against several implementations of the same interface."""
