"""A small kubelet that runs each container as a local process.

:class:`ProcessKubelet` registers one Ready node, plays the scheduler for it (binds
unscheduled pods through ``pods/binding``, up to an optional pod capacity) and runs
each container's ``command``/``args`` as a local process in its own mount namespace,
with the container's environment resolved and its volumes mounted at their real
paths. It reports pod status the way a kubelet does, honours ``restartPolicy`` and
graceful deletion, and offers fault hooks (eviction, OOM kill, crash) for tests.

The image is not pulled or used: the process runs on this machine's filesystem.
Images listed as unpullable leave the pod waiting in ``ErrImagePull``.

The modules, one concern each:

- :mod:`.node`: :class:`ProcessKubelet` (the public API and fault hooks, the pod
  watch), the Node object and its lease;
- :mod:`.scheduler`: binding Pending pods, up to a pod capacity;
- :mod:`.pod`: :class:`PodRuntime`, the lifecycle of one pod;
- :mod:`.process`: :class:`ContainerRun`, one run of a container as a process;
- :mod:`.status`: the pod status as the kubelet reports it;
- :mod:`.resolver`: environment, volume contents, downward API, ``$(VAR)``;
- :mod:`.volumes`: writing a pod's volumes on the node;
- :mod:`.security`: security contexts and the configurations the kubelet refuses;
- :mod:`.restarts`: restart policy and crash-loop back-off;
- :mod:`.faults`, :mod:`.objects`: what the others share.
"""

from .faults import PodFault
from .node import ProcessKubelet, keep_lease, register_node
from .objects import TERMINAL_PHASES, now
from .pod import PodRuntime
from .process import LOG_FALLBACK_LIMIT, TERMINATION_MESSAGE_LIMIT, ContainerRun
from .resolver import PodResolver, expand, field_value, resource_value
from .restarts import crash_backoff
from .scheduler import Scheduler
from .security import security_context, security_error, volume_owner

__all__ = [
    "LOG_FALLBACK_LIMIT", "TERMINAL_PHASES", "TERMINATION_MESSAGE_LIMIT", "ContainerRun",
    "PodFault", "PodResolver", "PodRuntime", "ProcessKubelet", "Scheduler", "crash_backoff",
    "expand", "field_value", "keep_lease", "now", "register_node", "resource_value",
    "security_context", "security_error", "volume_owner",
]
