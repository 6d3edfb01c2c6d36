"""mole test-suite."""
