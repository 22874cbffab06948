"""Airflow plugin: the listener that notes who marked a DermaOps run failed (dermaops_runner.marks)."""
