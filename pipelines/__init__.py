"""cl-audit orchestration: the Ray DAG, MLflow records and the command line."""
