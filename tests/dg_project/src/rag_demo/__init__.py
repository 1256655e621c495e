"""A sample Dagster project with two RAG indexes (tests/test_integration_dg.py)."""
