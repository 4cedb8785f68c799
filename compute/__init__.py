"""The only code that knows Ray and Dask: sessions, the Dask ETL graph, training and tuning."""
