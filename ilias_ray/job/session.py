"""The Ray connection of one run: made once, with the settings its workers need, and closed
before the command's last line."""

from __future__ import annotations

import json
import logging
import os
import warnings

from ilias_ray.config import Config

FORWARDED_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION")


def job_env_vars() -> dict:
    """The env_vars of the runtime env this driver was submitted with (`ray job submit
    --runtime-env-json`), from what Ray hands a job's entrypoint; {} outside a job."""
    try:
        job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
        return dict((job.get("runtime_env") or {}).get("env_vars") or {})
    except (ValueError, AttributeError, TypeError):
        return {}


_STARTED = []  # set when this process connected to Ray (a caller's own connection is left alone)


def quiet_ray_data_console() -> None:
    """Ray Data's own console lines (notices, and the tracebacks of failures that this tool reports
    in one line) are not for our users; they stay in its log file (ray-data.log in the session's
    log directory). ILIAS_RAY_DEBUG=1 keeps them on the console."""
    if os.environ.get("ILIAS_RAY_DEBUG"):
        return
    import ray.data  # noqa: F401 - Ray Data adds its console handler when first imported: quiet it after that

    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.CRITICAL)


def init_ray(cfg: Config):
    import ray

    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        _STARTED.append(True)
        kwargs = dict(logging_level=logging.WARNING, log_to_driver=True)
        # ILIAS_RAY_* settings (debugging, test fault injection) and the object store's endpoint and
        # region reach this job's workers on any cluster. Credentials never travel this way: each
        # node takes its own from the standard places. What a submitted job's own runtime env
        # already sets reaches them anyway, and Ray refuses a driver that sets it again.
        given = job_env_vars()
        ours = {
            k: v for k, v in os.environ.items() if (k.startswith("ILIAS_RAY_") or k in FORWARDED_ENV) and k not in given
        }
        if ours:
            kwargs["runtime_env"] = {"env_vars": ours}
        if address:
            ray.init(address=address, **kwargs)
        else:
            # "local": a new single-node cluster, not whatever `ray start` last left on this machine.
            ray.init(address="local", include_dashboard=False, **kwargs)
    quiet_ray_data_console()
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks")
    ctx = ray.data.DataContext.get_current()
    # A stage's error reaches the driver as itself (in Ray's RayTaskError), not as Ray Data's
    # UserCodeException with the original lost on the way: the CLI finds a UserError by its type.
    ctx.raise_original_map_exception = True
    ctx.enable_progress_bars = False  # our own per-file lines are readable in job logs
    ctx.print_on_execution_start = False
    # Waiting for autoscaled GPU nodes must not count as "no progress".
    ctx.execution_no_progress_timeout_s = 6 * 3600
    return ray


def stop_ray() -> None:
    """Disconnect the Ray connection this process made, so that Ray's own shutdown messages come
    before, not after, the one line the command ends with."""
    if _STARTED:
        import ray

        _STARTED.clear()
        try:
            if ray.is_initialized():
                ray.shutdown()
        except Exception:  # noqa: BLE001 - never hide the error being reported
            pass
