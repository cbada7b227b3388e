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


def schedule(class_name: str, queue: str, seconds: str, kwargs: str = "{}") -> None:
    """``ScheduledJob.create_schedule`` of a test Job to run once, ``seconds`` from now, on a
    Celery JobQueue named ``queue``, as Nautobot's "Schedule" form does; prints its id."""
    from datetime import timedelta

    from django.utils import timezone
    from nautobot.extras.choices import JobExecutionType
    from nautobot.extras.models import ScheduledJob

    job = Job.objects.get(module_name="k8s_celery_jobs", job_class_name=class_name)
    job_queue, _ = JobQueue.objects.get_or_create(name=queue, defaults={"queue_type": "celery"})
    job.job_queues.add(job_queue)
    user = get_user_model().objects.get(username="admin")
    scheduled = ScheduledJob.create_schedule(job, user, name=f"{class_name} in {seconds} s",
                                             start_time=timezone.now() + timedelta(seconds=int(seconds)),
                                             interval=JobExecutionType.TYPE_FUTURE, job_queue=job_queue,
                                             job_kwargs=json.loads(kwargs))
    print(scheduled.pk)


def cancel(result_id: str) -> None:
    """Cancel a JobResult as Nautobot's API does (``POST /api/extras/job-results/<id>/cancel/``):
    the strategy of its queue type, as the admin; prints what it said."""
    from nautobot.extras.jobs_cancel import CancelFactory

    result = JobResult.objects.get(pk=result_id)
    strategy = CancelFactory.get_strategy(result.queue_type)
    liveness = strategy.liveness(result)
    answer = strategy.cancel(result, user=get_user_model().objects.get(username="admin"))
    print(json.dumps({"liveness": liveness.display, "canceled": answer["canceled"], "error": answer["error"]}))


if __name__ == "__main__":
    {"prepare": prepare, "enqueue": enqueue, "schedule": schedule, "cancel": cancel}[sys.argv[1]](*sys.argv[2:])
