"""Reading runs back: comparison tables, paired statistics and figures from MLflow, and cross-lingual
alignment."""
