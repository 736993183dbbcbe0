"""Planning: the demand function, the planner (floors from guarantees, the split) and its reports."""
