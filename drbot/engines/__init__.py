"""Database engines: dump, load and fingerprint a source."""
