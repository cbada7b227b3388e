# Sourced by the scripts: moves to the repository's root and defines `use_venv`.
#
#   source "$(dirname "$0")/lib/env.sh"
#   use_venv            # .venv with k8s-celery and its test extras; sets $VENV_PYTHON
#   "$(base_python)"    # the interpreter virtualenvs are made from
#
# $PYTHON picks the interpreter the virtualenv is made from (default: python3.11, else
# python3). The package is installed in editable mode, so a change of the code needs no
# reinstall; pip runs again only when setup.cfg or pyproject.toml changed since.
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
REPO_ROOT="$PWD"

base_python() {
    local base="${PYTHON:-python3.11}"
    command -v "$base" >/dev/null || base=python3
    echo "$base"
}

use_venv() {
    local stamp=.venv/.k8s-celery-installed inputs
    [[ -x .venv/bin/python ]] || "$(base_python)" -m venv .venv
    inputs="$(cat setup.cfg pyproject.toml | sha256sum)"
    if [[ "$(cat "$stamp" 2>/dev/null)" != "$inputs" ]]; then
        .venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
        echo "$inputs" >"$stamp"
    fi
    VENV_PYTHON="$REPO_ROOT/.venv/bin/python"
}
