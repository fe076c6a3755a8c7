"""Models lkpatch ships (registered with timm on import)."""
