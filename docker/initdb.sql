-- The databases `cnnlab stack up` creates: the MLflow backend store and the Optuna storage.
CREATE DATABASE mlflow;
CREATE DATABASE optuna;
