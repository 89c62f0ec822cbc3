"""Data: synthetic ShapesWorld generation, dataset readers, and image/text processors."""
