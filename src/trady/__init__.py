"""trady: fine-tune a pretrained network under a hard training-memory budget."""

__version__ = "0.1.0"
