"""The long-running daemon: scheduling, supervision, health, metrics, alerts."""
