"""MLflow-free, Optuna-free: data, models, augmentation, the loop, evaluation, statistics, calibration, the pipeline."""
