"""Restore drills: sandboxes (docker, process), checks, planning and the drill runner."""
