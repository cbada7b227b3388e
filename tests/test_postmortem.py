"""Which Jobs are kept and how Events are summed up (pure); the keeping itself runs in
tests/test_task_output_e2e.py against the local cluster."""

import time

from k8s_celery.postmortem import ANNOTATION_KEEP_UNTIL, _iso, kept, summarize_events


def job(annotations):
    return {"metadata": {"name": "j", "annotations": annotations}}


def test_a_job_is_kept_until_its_annotation_says():
    assert kept(job({ANNOTATION_KEEP_UNTIL: _iso(time.time() + 60)}))
    assert not kept(job({ANNOTATION_KEEP_UNTIL: _iso(time.time() - 1)}))
    assert not kept(job({})) and not kept({"metadata": {}})
    assert not kept(job({ANNOTATION_KEEP_UNTIL: "not a time"}))


def event(reason, message, when, type_="Warning"):
    return {"reason": reason, "message": message, "type": type_, "lastTimestamp": when}


def test_events_are_summed_up_newest_last_without_repeats_or_noise():
    events = [event("FailedMount", 'MountVolume.SetUp failed for volume "payload" : secret "x" not found',
                    "2026-01-01T00:00:03Z"),
              event("Scheduled", "Successfully assigned", "2026-01-01T00:00:01Z", "Normal"),
              event("MissingClusterDNS", "kubelet does not have ClusterDNS IP configured", "2026-01-01T00:00:02Z"),
              event("FailedScheduling", "0/1 nodes are available: 1 Insufficient cpu.", "2026-01-01T00:00:00Z"),
              event("FailedMount", 'MountVolume.SetUp failed for volume "payload" : secret "x" not found',
                    "2026-01-01T00:00:05Z")]
    assert summarize_events(events) == (
        "FailedScheduling: 0/1 nodes are available: 1 Insufficient cpu.; "
        'FailedMount: MountVolume.SetUp failed for volume "payload" : secret "x" not found')
    assert summarize_events([]) == ""
