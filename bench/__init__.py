"""The benchmark of issue 7: dispatch and completion latency, API requests per task,
launch throughput, footprint and pod-side overhead of k8s-celery (``python -m bench``)."""
