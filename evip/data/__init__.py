"""Streaming image-text data: sources -> mixture -> samples -> packs, resumable to the sample."""
