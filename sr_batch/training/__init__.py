"""Training and evaluation of the super-resolution network on real Sentinel-2 data."""
