"""recbuild: im2rec.py-compatible .lst/.rec/.idx packing that is faster and never loses an image."""
