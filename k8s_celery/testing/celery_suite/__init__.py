"""Celery's own integration suite against k8s-celery, or against the stock prefork pool.

``python -m k8s_celery.testing.celery_suite`` (or ``scripts/celery-suite.sh``) runs
``t/integration/test_tasks.py`` and ``t/integration/test_canvas.py`` from the sdist of
the *installed* Celery. The parts:

* :mod:`.sdist`: pip-downloads the sdist once into ``~/.cache/k8s-celery/`` and
  extracts only its ``t/`` tree and ``pyproject.toml`` (nothing of Celery's lands in
  this repository), then appends a block to the cached ``t/integration/conftest.py``
  that wires in :mod:`.plugin`.
* :mod:`.plugin`: what that block wires in: the session worker's pool (``prefork``, or
  ``k8s_celery.pool:KubernetesPool`` with a Job manifest per queue), its parameters,
  Celery's ``manager`` fixture with a bounded teardown, the selection hooks and the
  report; and the app the pods load, rebuilt from the suite's fixtures.
* :mod:`.selection`: the tests left out on the shim (:data:`~.selection.EXCLUDED`),
  the tests known to fail for reasons that are not the shim's
  (:data:`~.selection.KNOWN_FAILURES`, run as non-strict xfails) and what ``--ci`` runs.
* :mod:`.cli`: the command line: starts Redis (and ``LocalCluster`` for the shim),
  runs pytest, prints ``N passed of M (excluded: K)``.

Reruns are off: Celery's ``@flaky`` marks ask pytest-rerunfailures for 5 reruns; the
plugin is disabled, so a failure is reported as it happened and a broken shim cannot
multiply the run time by six.
"""

from __future__ import annotations

#: The suite's files, under ``t/integration/``.
SUITE_FILES = ("test_tasks.py", "test_canvas.py")
#: ``--pool`` choices and the pool each one gives the session worker.
POOLS = {"kubernetes": "k8s_celery.pool:KubernetesPool", "prefork": "prefork"}
#: The namespace the shim's Jobs run in.
NAMESPACE = "celery-suite"
#: Environment of the pods: the JSON spec of the suite's app (see :func:`.plugin.build_app`).
APP_SPEC_ENV = "K8S_CELERY_SUITE_APP"
#: Environment of the pytest process: the JSON options of the run.
OPTIONS_ENV = "K8S_CELERY_SUITE_OPTIONS"
#: ``K8S_CELERY_APP`` of the pods.
POD_APP = "k8s_celery.testing.celery_suite.plugin:app"
