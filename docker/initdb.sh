#!/bin/sh
# First start of the postgres container: login roles mlflow and optuna (no superuser, no CREATEDB/CREATEROLE) own
# their databases, which no one else may connect to. The passwords come from the secret files through psql
# variables (psql's backticks), never from a command line.
set -eu
psql -v ON_ERROR_STOP=1 --no-psqlrc --username "$POSTGRES_USER" --dbname postgres <<'SQL'
\set mlflow_password `cat /run/secrets/mlflow_db_password`
\set optuna_password `cat /run/secrets/optuna_db_password`
CREATE ROLE mlflow LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'mlflow_password';
CREATE ROLE optuna LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD :'optuna_password';
CREATE DATABASE mlflow OWNER mlflow;
CREATE DATABASE mlflow_auth OWNER mlflow;
CREATE DATABASE optuna OWNER optuna;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
SQL
