"""One module per patched target; each defines PATCH, a mps_shim.registry.Patch subclass."""
