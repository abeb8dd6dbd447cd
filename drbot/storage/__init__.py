"""Destinations: where encrypted artifacts and manifests are stored."""
