"""What the tests ask of Nautobot, as its UI and API do it, in a process of its own:
``python nautobot_actions.py COMMAND ...`` (the test process never imports Nautobot)."""

from __future__ import annotations

import json
import sys

import nautobot

nautobot.setup()

from django.contrib.auth import get_user_model  # noqa: E402
from nautobot.extras.models import Job, JobQueue, JobResult  # noqa: E402


def prepare() -> None:
    """A superuser, and every test Job enabled."""
    user_model = get_user_model()
    if not user_model.objects.filter(username="admin").exists():
        user_model.objects.create_superuser("admin", "admin@example.com", "admin")
    Job.objects.filter(module_name="k8s_celery_jobs").update(enabled=True)
    print(json.dumps(sorted(Job.objects.filter(module_name="k8s_celery_jobs").values_list("job_class_name",
                                                                                          flat=True))))


def enqueue(class_name: str, queue: str, kwargs: str = "{}") -> None:
    """``JobResult.enqueue_job`` of a test Job on a Celery JobQueue named ``queue``; prints its id."""
    job = Job.objects.get(module_name="k8s_celery_jobs", job_class_name=class_name)
    job_queue, _ = JobQueue.objects.get_or_create(name=queue, defaults={"queue_type": "celery"})
    job.job_queues.add(job_queue)
    user = get_user_model().objects.get(username="admin")
    result = JobResult.enqueue_job(job, user, job_queue=job_queue, job_kwargs=json.loads(kwargs))
    print(result.pk)


if __name__ == "__main__":
    {"prepare": prepare, "enqueue": enqueue}[sys.argv[1]](*sys.argv[2:])
