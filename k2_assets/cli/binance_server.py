"""`k2 binance-server`: the local Binance-compatible recording server in the foreground."""

from __future__ import annotations

import argparse
import asyncio
import signal

from k2_resources.binance.recording_server import DEFAULT_PORT, RecordingServer, ServerFaults


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "binance-server", help="serve the bundled Binance recording as a combined stream on 127.0.0.1"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = free)")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="speed factor (default 1 = as recorded; 0 = as fast as possible)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--loop",
        dest="loop",
        action="store_true",
        default=True,
        help="play forever, shifting times and trade ids each pass (default)",
    )
    mode.add_argument(
        "--once",
        dest="loop",
        action="store_false",
        help="play the recording once, then close with 1000 'end of recording'",
    )
    parser.add_argument(
        "--time-base",
        choices=["recorded", "now"],
        default=None,
        help="recorded times, or a live-like tape at the current time "
        "(default: now when looping, recorded with --once)",
    )
    parser.add_argument(
        "--resume-overlap", type=int, default=3, help="trades a reconnecting client receives again (default 3)"
    )
    parser.add_argument("--drop-after", type=int, default=None, help="fault: close each connection after N frames")
    parser.add_argument("--repeat-every", type=int, default=None, help="fault: resend the last 3 trades every N")
    parser.add_argument("--malformed-every", type=int, default=None, help="fault: a malformed frame every N trades")
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    faults = ServerFaults(
        drop_after=args.drop_after, repeat_every=args.repeat_every, malformed_every=args.malformed_every
    )
    server = RecordingServer(
        port=args.port,
        speed=args.speed if args.speed > 0 else None,
        loop=args.loop,
        time_base=args.time_base or ("now" if args.loop else "recorded"),
        resume_overlap=args.resume_overlap,
        faults=faults,
    )
    asyncio.run(_serve(server))
    stats = server.stats()
    print(
        f"stopped: {stats.connections} connections, {stats.trade_frames} trade frames, "
        f"{stats.unique_trades} distinct trades sent",
        flush=True,
    )
    return 0


async def _serve(server: RecordingServer) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        print(
            f"Binance recording server on {server.url} ({len(server.tape.trades)} recorded trades; Ctrl-C stops)",
            flush=True,
        )
        await stop.wait()
