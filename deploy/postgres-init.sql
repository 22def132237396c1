-- One database per service (the registry's is created by POSTGRES_DB).
CREATE DATABASE features OWNER strata;
CREATE DATABASE inference OWNER strata;
