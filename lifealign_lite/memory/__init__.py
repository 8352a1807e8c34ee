"""Long-term memory: consolidation math, the adapter bank on disk, and domain routing."""
