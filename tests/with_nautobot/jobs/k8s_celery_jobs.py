"""Nautobot Jobs the end-to-end tests run on k8s-celery, written as Nautobot users write theirs."""

import os
import time

from nautobot.apps.jobs import IntegerVar, Job, StringVar, register_jobs
from nautobot.extras.models import Status

name = "k8s-celery tests"


class LogAndReturn(Job):
    """Logs at every level Nautobot knows (its own success and failure included), prints, returns."""

    word = StringVar(default="hello")

    class Meta:
        name = "Log and return"

    def run(self, word):
        self.logger.debug("debug %s", word)
        self.logger.info("info %s", word)
        self.logger.success("success %s", word)
        self.logger.warning("warning %s", word)
        self.logger.failure("failure %s", word)
        status = Status.objects.get(name="Active")
        self.logger.info("about an object", extra={"object": status})
        print(f"printed {word}")
        return f"returned {word} from {os.environ.get('HOSTNAME', '?')}"


class Broken(Job):
    """Raises after logging one line."""

    class Meta:
        name = "Broken"

    def run(self):
        self.logger.info("about to break")
        raise RuntimeError("this job is broken")


class Sleeper(Job):
    """Logs, then sleeps (a pod to delete while it runs)."""

    seconds = IntegerVar(default=30)

    class Meta:
        name = "Sleeper"

    def run(self, seconds):
        self.logger.info("sleeping %d s", seconds)
        time.sleep(seconds)
        return f"slept {seconds}"


register_jobs(LogAndReturn, Broken, Sleeper)
