"""Model layouts: layers with their life cycles and buffers, the catalog, layout JSON and HF configs,
and the grouping of layers into layer groups and pool groups."""
