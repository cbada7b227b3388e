"""The tests' Nautobot configuration: Nautobot's defaults, read from the NAUTOBOT_* variables
the tests set (database, Redis, secret key, NAUTOBOT_ROOT with the test Jobs)."""

from nautobot.core.settings import *  # noqa: F401,F403

ALLOWED_HOSTS = ["*"]
