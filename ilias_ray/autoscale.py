"""Growth on an autoscaling cluster: what bounds the model pool, and who asks the autoscaler for nodes.

Invariants (measured on Ray 2.60's fake autoscaling cluster by tests/test_autoscale.py):

- The job itself never asks the autoscaler for resources. Ray Data does: its cluster autoscaler
  asks for up to the model stage's `max_size` GPU bundles (what one model actor takes:
  {"GPU": 1, "CPU": 1}) and for CPU bundles for decoding, and a pending model actor adds a GPU node
  by itself. So with the model as the bound, `--use_gpu true --model_actors N` reaches N GPU
  nodes from none (Ray issue #59144, a GPU pool stuck at its first actor, does not happen there),
  and with decoding as the bound the CPU nodes it adds decode.
- A request of our own (`ray.autoscaler.sdk.request_resources`) would not stay in place: Ray Data
  keeps the cluster's one standing request for itself and writes it again on each change and every
  20 s. Nor do we clear it at the end: Ray Data cancels its own request when the run's execution
  shuts down, whether the run finished or failed (and a dead driver's request expires after 180 s),
  so idle nodes go after the autoscaler's idle timeout; clearing it ourselves would also drop
  requests of other jobs on the same cluster.
- So what bounds GPU growth is the pool's maximum, `--model_actors`. Without it the pool is capped
  at the GPUs up when the run starts (at least one), and the run says so in one line (cap_notice).
"""

from __future__ import annotations

from typing import Optional


def cap_notice(model_actors: Optional[int], gpu: bool, max_actors: int) -> Optional[str]:
    """The one line a GPU run prints when --model_actors is not given; None otherwise."""
    if not gpu or model_actors:
        return None
    return (
        f"model pool: at most {max_actors} GPU actor(s), the GPUs up now; pass --model_actors N "
        "to let it grow onto GPU nodes an autoscaler adds"
    )
