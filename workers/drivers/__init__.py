"""Sandbox drivers. Each implements `workers.drivers.base.SandboxDriver`; none imports another."""
