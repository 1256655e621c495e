"""rag_assets: an incremental index manager for retrieval-augmented generation."""

__version__ = "0.1.0"
