"""Create Jobs (and their payload Secrets) from concurrent threads, as fast as the API server takes them.

Run in its own process, like the shim, so that it competes for no interpreter lock::

    python -m bench.rawcreate KUBECONFIG THREADS FILE

``FILE`` holds a JSON list of ``{"job": {...}, "secret": {...} or null}``; each
Secret is created after its Job, with the Job's uid in its owner reference.
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from k8s_celery.cluster import KubeApi, RateLimiter, collection_path, load_configuration


def create_all(api: KubeApi, objects: list[dict], threads: int) -> None:
    def create(pair: dict) -> None:
        job = pair["job"]
        created = api.create(collection_path("jobs", job["metadata"]["namespace"]), job)
        secret = pair["secret"]
        if secret:
            secret["metadata"]["ownerReferences"][0]["uid"] = created["metadata"]["uid"]
            api.create(collection_path("secrets", secret["metadata"]["namespace"]), secret)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(create, objects))


def main(argv: list[str]) -> int:
    kubeconfig, threads, path = argv[0], int(argv[1]), Path(argv[2])
    configuration = load_configuration(kubeconfig, in_cluster=False)
    configuration.connection_pool_maxsize = threads
    create_all(KubeApi(configuration, rate_limiter=RateLimiter(qps=0)), json.loads(path.read_text()), threads)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
