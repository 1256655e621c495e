"""PostgreSQL + pgvector storage: schema, stages, serving generations."""
