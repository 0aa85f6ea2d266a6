"""Memory: what a run needs and what the host and the devices have, checked before anything is
allocated; the out-of-memory errors that still happen become one message (`OutOfMemory`, exit 5).

Three lines of defence, in the order a run meets them:

1. Before allocating, on the host: data sources estimate the bytes they generate or read
   (`check_host_bytes`, a located error at the field that sets the size); the job builder
   compares the train state's bytes per device, known from its abstract description, with what
   the devices hold (`check_state`), and one eval batch with the host (`check_eval_batch`).
2. Before running, on the devices: the compiled train step's memory analysis (arguments +
   outputs - donated + temporaries, per device) against the device's limit (`check_step`).
   When it does not fit, changes that lower it are planned again (compiled for abstract inputs,
   nothing allocated) for up to `REMEDY_SEARCH_S` and the first that fits is named. The eval
   step is compiled and checked too when the train step's numbers say it may not fit.
3. At run time: XLA's RESOURCE_EXHAUSTED and numpy's MemoryError become `OutOfMemory`
   (`out_of_memory`) with the bytes parsed from XLA's message.

Devices without a memory limit (the CPU backend: its devices share the host's memory) are
compared with the host memory available now, divided among this process's devices: only what
cannot fit there even if nothing else ran is refused.

Modules: host.py (host memory, data and eval-batch checks), device.py (device budgets, the
state check), step.py (the compiled steps, re-planned remedies), runtime.py (XLA's and numpy's
errors).
"""

from accelctl.memory.device import WAYS_OUT, Budget, check_state, device_budget, shard_bytes
from accelctl.memory.host import (
    HOST_WAYS_OUT,
    check_eval_batch,
    check_host_bytes,
    format_bytes,
    host_available_bytes,
    show_bytes,
)
from accelctl.memory.runtime import out_of_memory, parse_xla_oom, stop_on_out_of_memory
from accelctl.memory.step import REMEDY_SEARCH_S, check_step, find_remedy

__all__ = [
    "HOST_WAYS_OUT",
    "REMEDY_SEARCH_S",
    "WAYS_OUT",
    "Budget",
    "check_eval_batch",
    "check_host_bytes",
    "check_state",
    "check_step",
    "device_budget",
    "find_remedy",
    "format_bytes",
    "host_available_bytes",
    "out_of_memory",
    "parse_xla_oom",
    "shard_bytes",
    "show_bytes",
    "stop_on_out_of_memory",
]
