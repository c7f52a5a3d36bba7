"""Many models at once: fleet manifests and audits, Ray workers."""
