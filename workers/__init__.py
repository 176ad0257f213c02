"""Per-host workers: the job runtime, and one driver module per sandbox runtime."""
