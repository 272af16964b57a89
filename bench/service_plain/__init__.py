"""The example service written the seeds' way, for the load comparison (bench/service_load.py)."""
