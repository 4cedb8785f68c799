"""The work: plain typed functions (pandas, Great Expectations, Delta), wrapped as Prefect tasks."""
