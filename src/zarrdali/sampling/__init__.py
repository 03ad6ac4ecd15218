"""Which samples an epoch serves, in which order, on which rank; resume."""
