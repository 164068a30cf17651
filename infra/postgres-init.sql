-- One Postgres serves both: MLflow's store is the default database (POSTGRES_DB=mlflow),
-- Prefect gets its own.
CREATE DATABASE prefect;
