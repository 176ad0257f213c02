"""sandfleet: run container and VM sandboxes, with or without GPUs, on a fleet of hosts."""
