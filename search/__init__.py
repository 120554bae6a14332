"""The driver: CLI, Ray Tune wiring, schedulers, Pareto front, MLflow tracking and export."""
