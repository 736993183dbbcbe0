"""Engine glue: page tables to the GPU without a sync, and the fake engine that verifies pages."""
