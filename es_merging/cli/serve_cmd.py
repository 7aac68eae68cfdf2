"""`es-merging serve`: run the MCP server over stdio (default) or streamable HTTP.

stdio: stdout carries only MCP protocol messages; every log line goes to stderr."""
from __future__ import annotations

import logging
import sys


def register(sub) -> None:
    p = sub.add_parser("serve", help="run the MCP server (stdio or streamable HTTP)",
                       description="Run the es-merging MCP server. Settings also come from ES_MERGING_* "
                                   "environment variables (see server/settings.py).")
    p.add_argument("--transport", choices=["stdio", "http"], default=None, help="default stdio")
    p.add_argument("--host", default=None, help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default 8765)")
    p.add_argument("--data-home", default=None, help="store, probes, models, zoo (default ~/.local/share/es-merging)")
    p.add_argument("--allow-root", action="append", default=None, metavar="DIR",
                   help="extra directory that path arguments may point into (repeatable)")
    p.add_argument("--data-dir", default=None, help="real-data directory (read-only root)")
    p.add_argument("--zoo-dir", default=None, help="embedded zoo directory (default DATA_HOME/zoo)")
    p.add_argument("--no-bootstrap", action="store_true", help="do not register or build the embedded zoo")
    p.set_defaults(func=_serve)


def _serve(args) -> int:
    from pathlib import Path

    from server.settings import Settings

    # logs to stderr only (cli.main configured the root logger; make sure no handler writes stdout)
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "stream", None) is sys.stdout:
            root.removeHandler(handler)
    if not root.handlers:
        logging.basicConfig(stream=sys.stderr, level=logging.INFO)
    settings = Settings.from_env(
        transport=args.transport, host=args.host, port=args.port,
        data_home=Path(args.data_home) if args.data_home else None,
        extra_roots=args.allow_root, data_dir=Path(args.data_dir) if args.data_dir else None,
        zoo_dir=Path(args.zoo_dir) if args.zoo_dir else None,
        bootstrap=False if args.no_bootstrap else None,
        log_level="DEBUG" if getattr(args, "verbose", False) else None,
    )
    from server.app import create_server

    if settings.transport == "http":
        from server.http import HttpConfigError, require_token, run_http

        try:
            require_token(settings)  # refuse before anything starts
            run_http(create_server(settings), settings)
        except HttpConfigError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    server = create_server(settings)
    server.run("stdio")
    return 0
