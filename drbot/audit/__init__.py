"""The tamper-evident audit trail: hash-chained, Ed25519-signed events, and their verification."""
