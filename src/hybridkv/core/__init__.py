"""Bottom layer: NewType ids, units, tiers, the error hierarchy and the upper bounds every config checks."""
