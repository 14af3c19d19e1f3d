"""The job as one streaming Ray Data dataset: read -> decode -> model actors -> sink stage."""

from __future__ import annotations

from ilias_ray.config import Config
from ilias_ray.job.sizing import (
    MODEL_ACTOR_RESTARTS,
    MODEL_BATCH_RETRIES,
    READ_CPUS,
    ROUTES_PER_SINK,
    decode_cap,
    fewest_blocks,
    forward_group,
    model_pool,
    read_concurrency,
)
from ilias_ray.job.stage_args import decoder, embedder_args, grouper
from ilias_ray.plan_types import Plan


def build_dataset(cfg: Config, plan: Plan, ray):
    """read -> decode -> model actors.

    A read task streams a unit's raw bytes in blocks of whole forward passes of one shape
    (stages/grouper.py); each block is decoded by a task of its own, spread over the nodes with a
    free CPU (Ray Data's default: a block's JPEG bytes cost far less to move than to decode), so a
    shard's images spread over as many CPUs as the cluster has; each block reaches a model actor
    whole. Rows leaving it carry features and bookkeeping only, never pixels or file bytes. The
    stages get the few settings each needs (decoder, embedder_args), never the whole Config.
    """
    from ray.data import ActorPoolStrategy, TaskPoolStrategy

    from ilias_ray.stages.blocks import ONE_ROW_BLOCKS
    from ilias_ray.stages.decode import decode_blocks
    from ilias_ray.stages.embed import Embedder
    from ilias_ray.stages.read import IliasDatasource

    pool = model_pool(cfg, ray)
    # The --selected_ids keys go to the object store once; read tasks carry a reference to them.
    keys = None if plan.selected_keys is None else ray.put(plan.selected_keys)
    source = IliasDatasource(plan.units, keys, grouper(cfg))
    pool.min_actors = max(1, min(pool.min_actors, fewest_blocks(source.todo(), forward_group(cfg))))
    reads = read_concurrency(cfg, pool, ray.cluster_resources().get("CPU", 1), source.num_tasks())
    ds = ray.data.read_datasource(source, num_cpus=READ_CPUS, override_num_blocks=source.num_tasks(), concurrency=reads)
    ds.context.target_max_block_size = ONE_ROW_BLOCKS  # each block (one packed row) stays whole: stages/blocks.py
    cap = decode_cap(cfg, pool)
    ds = ds.map_batches(
        decode_blocks,
        fn_kwargs={"dec": decoder(cfg)},
        batch_size=None,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=cap) if cap else None,
        num_cpus=pool.decode_cpus,
    )
    # One block (whole forward passes of one shape, stages/grouper.py) per call: batch_size=None. Ray's
    # public map_batches refuses that with GPUs; map_batches_internal (a DeveloperAPI, what Ray's own
    # map_groups calls for GPU actors) is the same stage without that check.
    ds = ds.map_batches_internal(
        Embedder,
        fn_constructor_kwargs=dict(embedder_args(cfg), threads=pool.threads),
        batch_size=None,
        batch_format="numpy",
        compute=ActorPoolStrategy(min_size=pool.min_actors, max_size=pool.max_actors),
        max_restarts=MODEL_ACTOR_RESTARTS,
        max_task_retries=MODEL_BATCH_RETRIES,
        **pool.actor_res,
    )
    return ds, pool


def sink_stage(ray, ds, plan: Plan, n: int) -> tuple:
    """`ds` with the sink stage added, and its n sink actors: the actors live on the driver's node
    (which owns --hdf5_dir's staging), each owning the outputs o with o % n == its index, and the
    stage is a task pool (stages/sink.route) that hands each row to its output's sink. Never restarted: a
    new sink would lack the rows the dead one had taken, so its outputs could never finish (the
    run stops, and a rerun resumes). The caller kills the actors when the run ends."""
    from ray.data import TaskPoolStrategy

    from ilias_ray.stages.sink import Sink, route

    here = {f"node:{ray.util.get_node_ip_address()}": 0.001}
    actor = ray.remote(Sink).options(num_cpus=0, max_restarts=0, resources=here)
    sinks = [actor.remote(plan.outputs, plan.format, k, n) for k in range(n)]
    ds = ds.map_batches(
        route,
        fn_kwargs={"sinks": sinks},
        batch_size=None,
        batch_format="numpy",
        compute=TaskPoolStrategy(size=ROUTES_PER_SINK * n),
        num_cpus=0,
    )
    return ds, sinks
