"""PostgreSQL: the schema (models), the engine, set-based writes (upsert) and sync state."""
