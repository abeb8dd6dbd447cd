"""drbot: backups for PostgreSQL and MongoDB that prove they restore."""

__version__ = "0.1.0"
