#!/usr/bin/env bash
# Celery's own integration tests (t/integration/test_tasks.py and test_canvas.py from the
# sdist of the installed Celery, downloaded once into ~/.cache/k8s-celery) against
# k8s-celery on the local cluster, or with `--pool prefork` against the stock pool as a
# baseline. Celery's @flaky reruns are off (pytest-rerunfailures disabled); every test has a
# timeout. Prints `N passed of M (excluded: K)`; exits 1 if a test that is not excluded failed.
#
#   bash scripts/celery-suite.sh                        # the whole suite on the shim
#   bash scripts/celery-suite.sh --pool prefork         # the baseline
#   bash scripts/celery-suite.sh --ci                   # the part that fits the CI budget
#   bash scripts/celery-suite.sh --only test_tasks.py -k retry -- -x   # after --: pytest options
#   bash scripts/celery-suite.sh --list-excluded        # the exclusions and their reasons
set -euo pipefail
source "$(dirname "$0")/lib/env.sh"
bash scripts/setup.sh
use_venv
exec "$VENV_PYTHON" -m k8s_celery.testing.celery_suite "$@"
