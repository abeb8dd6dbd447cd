"""PostgreSQL: logical backups (pg_dump / pg_restore) and a local throwaway server."""
