"""`k2 cluster start|stop|status`: the scale-out topology on this machine, under K2_HOME/cluster.

The topology is a list of services (k2_resources.platform.cluster_env.ClusterService), started in order and
stopped in reverse. Each start returns the variables K2 needs to use that service; together they
go to K2_HOME/cluster/env.sh, which `k2 run --cluster` (or `source`) reads. Adding a service is one
entry in ``services()``.
"""

from __future__ import annotations

import argparse
import time

from k2_resources.platform.cluster_env import ClusterService, env_file, write_env_file
from k2_resources.platform.cluster_services import object_store_service, postgres_service
from k2_resources.platform.kafka_cluster import kafka_service


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cluster", help="start, stop or inspect the local scale-out topology (3 Kafka brokers ...)"
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.set_defaults(handler=_run)


def services() -> list[ClusterService]:
    """The topology's services, in start order."""
    return [kafka_service(), object_store_service(), postgres_service()]


def start(chosen: list[ClusterService]) -> dict[str, str]:
    """Start each service in turn (timing each) and write the env file; on a failure, stop what started."""
    env: dict[str, str] = {}
    started: list[ClusterService] = []
    began = time.monotonic()
    try:
        for service in chosen:
            print(f"starting {service.name} ...", flush=True)
            service_began = time.monotonic()
            env.update(service.start())
            started.append(service)
            print(f"{service.name} ready in {time.monotonic() - service_began:.1f}s", flush=True)
    except BaseException:
        stop(list(reversed(started)))
        raise
    path = write_env_file(env)
    print(f"cluster ready in {time.monotonic() - began:.1f}s; its settings are in {path}:", flush=True)
    for name, value in sorted(env.items()):
        print(f"  {name}={_shown(name, value)}")
    print("run K2 on it with `k2 run --cluster`; stop it with `k2 cluster stop`", flush=True)
    return env


# Generated credentials stay in the 0600 env file; a terminal or a CI log shows that they are set.
_SECRET_WORDS = ("SECRET", "PASSWORD", "CREDENTIAL", "TOKEN")


def _shown(name: str, value: str) -> str:
    return "(set; see the env file)" if any(word in name.upper() for word in _SECRET_WORDS) else value


def stop(chosen: list[ClusterService]) -> None:
    for service in chosen:
        service.stop()
        print(f"{service.name} stopped", flush=True)


def _run(args: argparse.Namespace) -> int:
    chosen = services()
    if args.action == "start":
        start(chosen)
    elif args.action == "stop":
        stop(list(reversed(chosen)))
        env_file().unlink(missing_ok=True)
    else:
        all_up = True
        for service in chosen:
            up, lines = service.status()
            all_up = all_up and up
            print(f"{service.name}: {'up' if up else 'DOWN'}")
            for line in lines:
                print(f"  {line}")
        return 0 if all_up else 3
    return 0
