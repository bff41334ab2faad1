"""Pure logic, no services (fakes allowed)."""
