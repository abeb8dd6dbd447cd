"""Operations: backup, verify, restore, cleanup. They take built objects, never settings."""
