-- deployments/compose.yaml: run once by the postgres image on an empty data volume. One server, one
-- database each for Prefect and MLflow, owned by the stack's user (POSTGRES_USER).
CREATE DATABASE prefect OWNER flywheel;
CREATE DATABASE mlflow OWNER flywheel;
