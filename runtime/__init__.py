"""System containers: images, ID-mapped rootfs, OCI spec, runc. Knows nothing of their users."""
