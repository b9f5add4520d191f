"""Everything MLflow and Optuna: runs, tracked experiments, tuning, the registry, comparisons, reproduction, transfer."""
