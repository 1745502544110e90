"""sabakan: the machine inventory."""
