"""GPU inventory (NVML, nvidia-smi, static file) and the host-local claim store.

Stdlib only (NVML loads on demand), so inventory discovery runs on any GPU host.
"""
