"""hostd: per-user system containers with a private Docker."""
