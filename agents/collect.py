"""Collectors: where the env steps come from. One interface, TorchRL's iterable collector, for three
set-ups; each yields batches of `collect_every` steps per env, stacked (envs, T) where there are several.

    collector=local, envs=1    torchrl Collector: the env in this process
    collector=local, envs=N    torchrl MultiSyncCollector: N env processes on this machine
    collector=ray,   envs=N    torchrl RayCollector: N Ray actors, each a Collector with one env, on a
                               local Ray instance started for the run or the cluster at `ray.address`

Every env gets its own seed (`seed + 1000 * i`, offset per data-parallel rank), so no two streams
repeat each other. The policy carries the recurrent state through the env's TensorDictPrimer either
way (agents/policy.py); after each learner phase `update_policy_weights_()` pushes the weights (and the
policy's mode buffer) to the workers. A Ray worker that dies stops the run with a `CollectorError`
after the last good batch; the caller checkpoints what it has, so nothing learnt is lost and the same
command resumes.
"""
from __future__ import annotations

import functools
from typing import Callable

from agents.config import ConfigError


class CollectorError(RuntimeError):
    """A collection worker that died or could not start; one line that says what to do."""


def env_seeds(seed: int, envs: int, rank: int = 0) -> list[int]:
    """One seed per env stream, distinct across envs and data-parallel ranks."""
    return [seed + 1000 * (rank * envs + i) for i in range(envs)]


def make_collector(train_cfg, make_env: Callable[[int], object], policy, device: str, seed: int, rank: int = 0):
    """The collector `train_cfg.collector` names, over `train_cfg.envs` envs built by `make_env(seed)`."""
    t = train_cfg
    fns = [functools.partial(make_env, s) for s in env_seeds(seed, t.envs, rank)]
    common = dict(total_frames=-1, policy_device=device, env_device="cpu", storing_device="cpu")
    if t.collector == "local":
        if t.envs == 1:
            from torchrl.collectors import Collector

            return Collector(fns[0], policy, frames_per_batch=t.collect_every, **common)
        from torchrl.collectors import MultiSyncCollector

        return MultiSyncCollector(fns, policy, frames_per_batch=t.collect_every * t.envs, cat_results="stack", **common)
    if t.collector == "ray":
        return RayCollection(fns, policy, t.collect_every, dict(t.ray))
    raise ConfigError(f"unknown collector '{t.collector}' (choose local or ray)")


class RayCollection:
    """TorchRL's RayCollector in synchronous mode, one env per actor, with the project's error handling:
    it waits for the actors to start before the first weight push (TorchRL's weight-sync rendezvous
    times out after 60 s, and a cold actor imports torch first), and turns a dead actor into a
    CollectorError instead of a hang or a traceback."""

    def __init__(self, fns: list, policy, frames_per_env: int, opts: dict):
        try:
            import ray
            from torchrl.collectors import Collector
            from torchrl.collectors.distributed import RayCollector
        except ImportError:
            raise ConfigError("collector=ray needs Ray: pip install 'longdream[distributed]'") from None
        self._ray, self._own = ray, not opts.get("address")
        cpus = float(opts.get("cpus_per_worker", 1))
        init = {"include_dashboard": False, "log_to_driver": bool(opts.get("log_to_driver", False))}
        if opts.get("address"):
            init["address"] = opts["address"]
        else:
            init["num_cpus"] = max(int(cpus * len(fns) + 0.999), 1)
        try:
            self.collector = RayCollector(
                fns, policy, frames_per_batch=frames_per_env * len(fns), total_frames=2**62, sync=True,
                collector_class=Collector,
                collector_kwargs={"env_device": "cpu", "storing_device": "cpu", "policy_device": "cpu"},
                ray_init_config=init,
                remote_configs={"num_cpus": cpus, "num_gpus": 0, "memory": int(opts.get("memory_gb", 1) * 2**30)})
            ray.get([c.__ray_ready__.remote() for c in self.collector.remote_collectors],
                    timeout=float(opts.get("start_timeout", 600)))
        except ConnectionError as e:
            raise CollectorError(f"cannot join the Ray cluster at ray.address={opts.get('address')} ({e}); start it "
                                 "(ray start --head), or leave ray.address unset for a local one; a cluster with "
                                 "token authentication needs RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN or "
                                 "~/.ray/auth_token)") from None
        except (ray.exceptions.RayError, TimeoutError) as e:
            self.shutdown()
            raise CollectorError(f"Ray collection workers did not start ({type(e).__name__}); "
                                 "check the cluster's free CPUs and memory (ray status)") from None
        self.collector.update_policy_weights_()

    @property
    def remote_collectors(self) -> list:
        return self.collector.remote_collectors

    def __iter__(self):
        it = iter(self.collector)
        while True:
            try:
                data = next(it)
            except self._ray.exceptions.RayError as e:  # an actor died (ActorDiedError) or its task failed
                raise CollectorError(f"a Ray collection worker failed ({type(e).__name__}); the run stops with "
                                     "its last checkpoint: run the same command again to resume") from None
            yield data

    def update_policy_weights_(self) -> None:
        try:
            self.collector.update_policy_weights_()
        except self._ray.exceptions.RayError as e:
            raise CollectorError(f"cannot push the weights to a Ray collection worker ({type(e).__name__}); "
                                 "the run stops with its last checkpoint: run the same command again to resume") from None

    def shutdown(self) -> None:
        collector = getattr(self, "collector", None)
        if collector is not None:
            try:
                collector.shutdown(shutdown_ray=self._own)  # a cluster joined stays up
            except Exception:  # noqa: BLE001 - a dead actor must not mask the error that stopped the run
                pass
