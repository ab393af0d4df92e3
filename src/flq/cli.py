"""The ``flq`` command: ``simulate``, ``plot`` (and the cluster commands).

Every config key is also a flag (``--mode``, ``--b_up``, ``--total_workers``
...), with the short aliases ``--rounds`` and ``--workers``; flags override
the config file. Errors in the config or the data stop the program with one
line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import zipfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from . import outcome
from .config import ConfigError, field_specs, load_config

log = logging.getLogger("flq.cli")

DEFAULT_CONFIG = "flq_config.json"
#: Where ``flq worker`` keeps its state by default (:mod:`flq.worker_state`), under its working directory.
DEFAULT_STATE_DIR = "worker_state"


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """``--config`` plus one flag per config key (string values are validated later)."""
    p.add_argument("--config", default=None, help=f"JSON config file (default: ./{DEFAULT_CONFIG} when it exists)")
    g = p.add_argument_group("config overrides (each is also a key of flq_config.json)")
    for name, _default, kind, help_text in field_specs():
        flags = [f"--{name}"]
        if name == "max_rounds":
            flags += ["--rounds", "--iters"]
        if name == "total_workers":
            flags += ["--workers"]
        if name == "master_host":
            flags += ["--host"]
        if name == "master_port":
            flags += ["--port"]
        g.add_argument(*flags, dest=f"cfg_{name}", default=None, metavar=kind, help=help_text)


def overrides_from(args: argparse.Namespace) -> Dict[str, Any]:
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_") and v is not None}


def config_from(args: argparse.Namespace):
    path = args.config
    if path is None and Path(DEFAULT_CONFIG).is_file():
        path = DEFAULT_CONFIG
    return load_config(path, overrides_from(args))


def cmd_simulate(args: argparse.Namespace) -> int:
    from .config import check_paths

    cfg = config_from(args)  # a bad key or value stops here, before PyTorch is even imported
    check_paths(cfg)
    from .logs import setup_logging
    from .outputs import remove_stale_temporaries
    from .simulate import simulate

    ray_options = None
    if args.backend == "ray":  # a missing Ray is one line, before any work
        from .ray_backend import check_address, check_options, require_ray

        require_ray()
        check_options(args.ray_actors, args.ray_threads, args.ray_timeout)
        check_address(args.ray_address)  # nothing there: one line in seconds, not Ray's minutes of retries
        ray_options = {
            "address": args.ray_address,
            "actors": args.ray_actors,
            "threads": args.ray_threads,
            "timeout_s": args.ray_timeout,
        }
    elif args.ray_address:
        raise ConfigError("--ray_address needs --backend ray")
    server = monitor = None
    if args.serve is not None:  # the port is taken before any work: one in use is one line, at once
        from .monitor import LocalRun, RunMonitor
        from .nodes import listen_on
        from .transport.dashboard import BackgroundServer, page_url, simulation_app

        if not 0 <= args.serve_linger <= 86400:  # NaN too
            raise ConfigError(f"--serve_linger {args.serve_linger}: expected seconds 0..86400")
        if args.serve != -1 and not 0 <= args.serve <= 65535:
            raise ConfigError(f"--serve {args.serve}: expected a port 0..65535 (0 = any free one)")
        sock = listen_on(
            args.serve_host,
            cfg.master_port if args.serve == -1 else args.serve,
            "--serve PORT",
            "master or dashboard",
            "--serve_host",
        )
        monitor = RunMonitor(cfg, LocalRun(cfg), "simulation")
        server = BackgroundServer(simulation_app(monitor, monitor.source, cfg.auth_token), sock)
        token = "?token=<auth_token>" if cfg.auth_token else ""
        print(f"dashboard: {page_url('http', args.serve_host, 0, sock)}{token}", file=sys.stderr, flush=True)
        if not cfg.auth_token and args.serve_host not in ("127.0.0.1", "::1", "localhost"):
            print(
                f"flq simulate: warning: the dashboard listens on {args.serve_host} with no auth_token: anyone who "
                "can reach the port sees the run and can stop it",
                file=sys.stderr,
                flush=True,
            )
    logfile = setup_logging(cfg.log_dir, f"simulate_{cfg.mode}", cfg.log_level, args.verbose, console_level="WARNING")
    remove_stale_temporaries(Path(cfg.results_dir))
    started = time.perf_counter()
    try:
        result = simulate(
            cfg,
            write=True,
            progress=not args.no_progress,
            monitor=monitor,
            backend=args.backend,
            ray_options=ray_options,
        )
    except BaseException:
        if server is not None:
            _linger(server, monitor, 0)
        raise
    took = time.perf_counter() - started
    last = next((r for r in reversed(result.records) if r["acc"] == r["acc"]), None)
    if last is not None:
        print(
            f"final: round {last['iter']} test accuracy {last['acc']:.4f} "
            f"cross-entropy {last['entropy']:.4f} cumulative bits {last['cum_bits_total']:.4g}"
        )
    if result.records:
        rounds_s = sum(r["round_time_s"] for r in result.records)
        n = len(result.records)
        print(
            f"time: {n} rounds in {rounds_s:.0f} s ({rounds_s / n:.2f} s/round, {result.threads} "
            f"thread(s)); {took:.0f} s with start-up, evaluation and writing the results"
        )
    if result.results_path is not None:
        print(f"results: {result.results_path}")
        if not result.not_saved:
            print(f"model: {result.results_path.with_suffix('.safetensors')}")
    print(f"log: {logfile}")
    if result.reason != outcome.COMPLETED:
        print(f"flq simulate: {result.detail} (exit {result.exit_status})", file=sys.stderr)
    if result.not_saved:
        print(f"flq simulate: {result.not_saved}", file=sys.stderr)
    elif not result.records:
        print("flq simulate: no round finished, so no results were written", file=sys.stderr)
    if args.plot and result.results_path is not None:
        from .plots import plot_name, plot_results

        # named after the run's spreadsheet (itself unique): runs never replace each other's figures
        out = Path(args.plot_dir or Path(cfg.results_dir) / "plots")
        for p in plot_results([result.results_path], out, name=plot_name([result.results_path])):
            print(f"plot: {p}")
    if server is not None:  # a run ended by a signal was asked to end now: no wait
        _linger(server, monitor, 0 if result.reason in (outcome.SIGINT, outcome.SIGTERM) else args.serve_linger)
    return result.exit_status


def _linger(server, monitor, seconds: float) -> None:
    """Keep the dashboard of a finished simulation up ``seconds`` more, so
    open pages get its final state, then stop it. The first SIGINT or
    SIGTERM ends the wait at once (the exit status stays the run's: nothing
    is lost by cutting it short)."""
    import signal
    import threading

    run = monitor.source
    if run.state != "finished":  # ended by an exception before the loop's end
        run.finish("error", "the simulation failed")
    if seconds > 0 and threading.current_thread() is threading.main_thread():
        ended = threading.Event()
        previous = {sig: signal.signal(sig, lambda signum, frame: ended.set()) for sig in outcome.stop_signals()}
        try:
            print(f"dashboard: showing the final state for {seconds:g} s more (Ctrl-C ends it)", file=sys.stderr)
            sys.stdout.flush()
            ended.wait(seconds)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    server.stop()


def cmd_plot(args: argparse.Namespace) -> int:
    from .plots import plot_name, plot_results
    from .results import read_results

    paths = [Path(p) for p in args.results]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise ConfigError(f"no such results file: {', '.join(missing)}")
    if args.name is not None and not args.name.strip():
        raise ConfigError("--name must not be empty")
    out = Path(args.out)
    before = set(out.iterdir()) if out.is_dir() else set()
    try:
        runs = [read_results(p) for p in paths]
        name = args.name if args.name is not None else plot_name(runs)
        written = plot_results(runs, out, name=name)
    except (ValueError, KeyError, OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"cannot plot: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    for p in written:
        print(p)
    replaced = [p for p in written if p in before]
    if replaced:
        print(f"flq plot: replaced {len(replaced)} earlier figure(s) named {name}_* in {out}", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import run_sweep

    path = Path(args.sweep)
    if not path.is_file():
        raise ConfigError(f"no such sweep file: {path}")
    if args.parallel < 0 or args.threads < 0:
        raise ConfigError(f"--parallel {args.parallel} --threads {args.threads}: expected counts >= 0")
    _, _, status = run_sweep(
        path,
        Path(args.out) if args.out else None,
        args.backend,
        args.parallel,
        args.threads,
        args.ray_address,
        say=lambda line: print(line, flush=True),
    )
    return status


def auth_token_source(flag: Optional[str], file_value: str) -> tuple:
    """``(token, where it came from)``: the flag, else ``$FLQ_AUTH_TOKEN``, else
    the config file (the usual order: flag > environment > file)."""
    env = os.environ.get("FLQ_AUTH_TOKEN", "")
    if flag is not None:
        return flag, "from --auth_token"
    if env:
        return env, "from $FLQ_AUTH_TOKEN"
    if file_value:
        return file_value, "from the config file (system.auth_token)"
    return "", "none set"


def cmd_master(args: argparse.Namespace) -> int:
    from .config import check_paths
    from .logs import setup_logging
    from .nodes import listen_on, load_resume_state, run_master

    # everything that can refuse the run does so before any log or work (and before PyTorch is imported)
    cfg = config_from(args)
    check_paths(cfg)
    _check_cert_pair(args.certfile, args.keyfile)
    if args.cafile:
        if not args.certfile:
            raise ConfigError("--cafile (require client certificates) needs --certfile and --keyfile (serve HTTPS)")
        _check_ca(args.cafile, "--cafile")
    if cfg.credentials:
        from .credentials import CredentialError, load_master_secret, too_open

        try:
            secret = load_master_secret(Path(cfg.credentials))
        except CredentialError as exc:
            raise ConfigError(f"system.credentials: {exc}") from None
        if secret.workers < cfg.total_workers:
            raise ConfigError(
                f"system.credentials {cfg.credentials} was made for {secret.workers} workers, the run has "
                f"{cfg.total_workers}: run flq credentials --workers {cfg.total_workers} --out NEW_DIR (or --force "
                f"into the same folder) and give every worker its new key"
            )
        if too_open(Path(cfg.credentials)):
            print(f"flq master: warning: {cfg.credentials} can be read by other users (chmod 600 it)", file=sys.stderr)
    if not 0 <= args.linger_s <= 3600:
        raise ConfigError(f"--linger_s {args.linger_s}: expected seconds 0..3600")
    sock = listen_on(cfg.master_host, cfg.master_port)  # held from now: a second master on the port is refused at once
    resume = load_resume_state(cfg, args.resume if isinstance(args.resume, str) else None) if args.resume else None
    token, source = auth_token_source(getattr(args, "cfg_auth_token", None), cfg.auth_token)
    cfg = cfg.replace(auth_token=token)
    logfile = setup_logging(cfg.log_dir, "master", cfg.log_level, args.verbose)
    log.info("log file %s", logfile)
    log.info(
        "auth token: %s%s",
        source,
        "" if token else ": POST /stop and GET /get_global_model are open to whoever can connect",
    )
    log.info(
        "worker calls: %s%s",
        f"signed with per-worker keys ({cfg.credentials})"
        if cfg.credentials
        else ("the bearer token only" if token else "not authenticated"),
        f"; HTTPS, client certificates of {args.cafile} required"
        if args.cafile
        else ("; HTTPS" if args.certfile else "; plain HTTP"),
    )
    if cfg.credentials and not token:
        log.warning(
            "per-worker credentials but no auth_token: any client that can connect (any worker, with mutual TLS) "
            "can POST /stop and download the model; set system.auth_token (or $FLQ_AUTH_TOKEN) to keep them to the "
            "operator"
        )
    end = run_master(
        cfg,
        run_id=logfile.stem[len("master_") :],
        certfile=args.certfile,
        keyfile=args.keyfile,
        cafile=args.cafile,
        resume=resume,
        linger_s=args.linger_s,
        sock=sock,
    )
    if end.not_saved:
        print(f"flq master: {end.not_saved}", file=sys.stderr)
    elif end.results_path is None:
        print("flq master: no round finished, so no results were written", file=sys.stderr)
    if end.reason != outcome.COMPLETED:
        print(
            f"flq master: run ended ({end.reason}){': ' + end.detail if end.detail else ''} (exit {end.exit_status})",
            file=sys.stderr,
        )
    return end.exit_status


def _check_ca(path: str, label: str) -> None:
    """A CA bundle that loads, else ConfigError."""
    import ssl

    if not Path(path).is_file():
        raise ConfigError(f"{label}: no such file {path}")
    try:
        ssl.create_default_context(cafile=path)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{label} {path}: not a usable CA certificate ({exc})") from None


def _check_cert_pair(certfile: Optional[str], keyfile: Optional[str]) -> Optional[tuple]:
    """``(certfile, keyfile)`` when both are given and load together, None when
    neither is, else ConfigError (one line)."""
    for label, path in (("--certfile", certfile), ("--keyfile", keyfile)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{label}: no such file {path}")
    if bool(certfile) != bool(keyfile):
        raise ConfigError("--certfile and --keyfile go together")
    if not certfile:
        return None
    import ssl

    try:
        ssl.create_default_context().load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            f"--certfile {certfile} / --keyfile {keyfile}: not a usable certificate "
            f"and key ({exc.reason if isinstance(exc, ssl.SSLError) else exc})"
        ) from None
    return (certfile, keyfile)


def _worker_security(args: argparse.Namespace):
    """``(credential or None, (certfile, keyfile) or None)`` from the worker's
    flags, checked before any work.

    Raises:
        ConfigError: unreadable or wrong credential, a credential of another
            id, a certificate without its key, or one that does not load.
    """
    credential = None
    path = args.credential if args.credential is not None else os.environ.get("FLQ_CREDENTIAL", "")
    if path:
        from .credentials import CredentialError, load_worker_credential

        try:
            credential = load_worker_credential(Path(path))
        except CredentialError as exc:
            raise ConfigError(str(exc)) from None
        if credential.worker_id != args.worker_id:
            raise ConfigError(
                f"--credential {path} is worker {credential.worker_id}'s, not worker {args.worker_id}'s: "
                f"each worker uses its own worker_<id>.key"
            )
        from .credentials import too_open

        if too_open(Path(path)):
            print(f"flq worker: warning: {path} can be read by other users (chmod 600 it)", file=sys.stderr)
    return credential, _check_cert_pair(args.certfile, args.keyfile)


def cmd_credentials(args: argparse.Namespace) -> int:
    from .credentials import CredentialError, write_credentials, write_tls

    try:
        written = write_credentials(Path(args.out), args.workers, force=args.force)
        if args.tls:
            written += write_tls(
                Path(args.out),
                args.workers,
                args.master_host or ["127.0.0.1", "localhost"],
                days=args.days,
                force=args.force,
            )
    except CredentialError as exc:
        raise ConfigError(str(exc)) from None
    except ImportError:
        raise ConfigError("--tls needs the cryptography package (pip install cryptography)") from None
    for p in written:
        print(p)
    out = Path(args.out)
    print(
        f"\nmaster:   flq master --credentials {out / 'master.secret'}"
        + (
            f" --certfile {out / 'master.pem'} --keyfile {out / 'master-key.pem'} --cafile {out / 'ca.pem'}"
            if args.tls
            else ""
        )
        + f"\nworker m: flq worker --worker_id m --credential {out / 'worker_m.key'}"
        + (
            f" --cafile {out / 'ca.pem'} --certfile {out / 'worker_m.pem'} --keyfile {out / 'worker_m-key.pem'}"
            if args.tls
            else ""
        )
        + "\neach host gets only its own files; master.secret"
        + (" and ca-key.pem stay" if args.tls else " stays")
        + " off the workers (deploy_jetson.sh --credentials DIR does this)",
        file=sys.stderr,
    )
    return 0


#: The largest worker id any run can have (``total_workers`` is at most 1000).
MAX_WORKER_ID = 999


def cmd_worker(args: argparse.Namespace) -> int:
    from .config import coerce
    from .logs import setup_logging
    from .nodes import run_worker
    from .transport.client import master_url

    if not 0 <= args.worker_id <= MAX_WORKER_ID:
        raise ConfigError(
            f"--worker_id {args.worker_id}: expected an integer 0..{MAX_WORKER_ID} (below the run's total_workers)"
        )
    local = {
        "device": args.device,
        "threads": args.threads,
        "data_dir": args.data_dir,
        "log_dir": args.log_dir,
        "enable_mixed_precision": args.enable_mixed_precision,
        "gpu_memory_limit_mb": args.gpu_memory_limit_mb,
    }
    for key, value in local.items():  # validate before any work
        if value is not None:
            coerce(key, value, f"--{key}")
    if args.master_port is not None:
        coerce("master_port", args.master_port, "--master_port")
    if args.cafile and not Path(args.cafile).is_file():
        raise ConfigError(f"--cafile: no such file {args.cafile}")
    if not 0 < args.give_up_s <= 7 * 24 * 3600:
        raise ConfigError(f"--give_up_s {args.give_up_s}: expected seconds > 0 and at most a week")
    try:
        url = master_url(args.master_ip, args.master_port, tls=bool(args.cafile or args.tls))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    state_dir = "" if args.no_state else args.state_dir
    if state_dir and Path(state_dir).exists() and not Path(state_dir).is_dir():
        raise ConfigError(f"--state_dir {state_dir}: not a folder")
    token, source = auth_token_source(args.auth_token, "")
    credential, client_cert = _worker_security(args)
    logfile = setup_logging(args.log_dir or "logs", f"worker{args.worker_id}", "INFO", args.verbose)
    log.info("log file %s", logfile)
    log.info(
        "worker %d joins %s; auth token: %s; %s%s; state %s",
        args.worker_id,
        url,
        source,
        "calls signed with its credential" if credential else "no credential",
        f"; client certificate {client_cert[0]}" if client_cert else "",
        f"in {state_dir}" if state_dir else "not saved",
    )
    end = run_worker(
        args.worker_id,
        url,
        local,
        auth_token=token,
        verify=args.cafile or True,
        give_up_s=args.give_up_s,
        state_dir=state_dir,
        credential=credential,
        client_cert=client_cert,
    )
    log.info(
        "worker %d done after %d rounds: %s (exit %d)",
        args.worker_id,
        end.rounds,
        end.detail or end.reason,
        end.exit_status,
    )
    if end.reason != outcome.COMPLETED:
        print(f"flq worker {args.worker_id}: {end.detail} (exit {end.exit_status})", file=sys.stderr)
    return end.exit_status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flq", description="FLQ-Fed: federated learning with low-bit, lazy, budgeted communication"
    )
    from . import __version__

    parser.add_argument("--version", action="version", version=f"flq-fed {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("simulate", help="run all workers in one process")
    add_config_flags(p)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--plot",
        action="store_true",
        help="also write the figures of this run, named after its spreadsheet: "
        "PLOT_DIR/<spreadsheet stem>_acc_vs_round.png ... (so runs never replace each other's)",
    )
    p.add_argument("--plot-dir", default=None, help="where --plot writes (default RESULTS_DIR/plots)")
    p.add_argument(
        "--serve",
        nargs="?",
        type=int,
        const=-1,
        default=None,
        metavar="PORT",
        help="serve the run's dashboard (GET /) and Prometheus metrics (/metrics) on PORT (default: master_port; "
        "0 = any free port), read-only but for its Stop button",
    )
    p.add_argument(
        "--serve_host", default="127.0.0.1", help="address the dashboard listens on (default 127.0.0.1: this machine)"
    )
    p.add_argument(
        "--serve_linger",
        type=float,
        default=5.0,
        metavar="S",
        help="keep the dashboard up S seconds after the run ends, for its final state (default 5)",
    )
    g = p.add_argument_group("where the workers run (README: Backends)")
    g.add_argument(
        "--backend",
        choices=("local", "ray"),
        default="local",
        help="local: every worker in this process (default); ray: the workers in a pool of Ray actors, "
        "bit-identical to local at the same thread count (pip install 'flq-fed[ray]')",
    )
    g.add_argument(
        "--ray_address",
        default=None,
        metavar="ADDR",
        help="an existing Ray cluster (host:port of `ray start --head`, or auto); default: start one here for the run",
    )
    g.add_argument(
        "--ray_actors",
        type=int,
        default=0,
        metavar="N",
        help="actors (default 0: one per T CPUs of the cluster)",
    )
    g.add_argument(
        "--ray_threads",
        type=int,
        default=0,
        metavar="T",
        help="PyTorch threads per actor (default 0: --threads when set, else 1); bit for bit local --threads T",
    )
    g.add_argument(
        "--ray_timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="the longest a round's phase waits for the actors, then the run ends (error), rounds kept (default 600)",
    )
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("master", help="serve a run to workers over HTTP (port 5000)")
    add_config_flags(p)
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.add_argument("--certfile", default=None, help="TLS certificate (PEM) to serve HTTPS")
    p.add_argument("--keyfile", default=None, help="TLS private key (PEM)")
    p.add_argument(
        "--cafile",
        default=None,
        help="require a client certificate signed by this CA from every client (mutual TLS; needs --certfile)",
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="CHECKPOINT",
        help="continue a run from its checkpoint: the newest of this dataset and mode in checkpoint_dir "
        "that no running master holds, or the .npz file given",
    )
    p.add_argument(
        "--linger_s",
        type=float,
        default=5.0,
        help="after the run ends, keep answering 410 to workers this long (seconds, default 5)",
    )
    p.set_defaults(func=cmd_master)

    p = sub.add_parser("worker", help="join a master as worker N")
    p.add_argument("--worker_id", type=int, required=True, help="this worker's id, 0..total_workers-1")
    p.add_argument(
        "--master_ip",
        default="127.0.0.1",
        help="master address: host name, IPv4, IPv6 (brackets optional), HOST:PORT or an http(s):// "
        "URL (default 127.0.0.1)",
    )
    p.add_argument("--master_port", default=None, help="master port (default: the address's, else 5000)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (this device's own setting)")
    p.add_argument("--threads", default=None, help="PyTorch threads on this device (0 = all cores)")
    p.add_argument("--data_dir", default=None, help="folder with the dataset's files (this device's own)")
    p.add_argument("--log_dir", default=None, help="where the worker log goes (default logs)")
    p.add_argument("--enable_mixed_precision", default=None, help="float16 autocast on CUDA (true/false)")
    p.add_argument("--gpu_memory_limit_mb", default=None, help="cap on this process's CUDA memory")
    p.add_argument(
        "--auth_token", default=None, help="bearer token (default $FLQ_AUTH_TOKEN; the flag wins over the environment)"
    )
    p.add_argument("--cafile", default=None, help="CA bundle to verify the master's HTTPS certificate")
    p.add_argument("--tls", action="store_true", help="talk HTTPS with the system CAs")
    p.add_argument(
        "--credential",
        default=None,
        metavar="FILE",
        help="this worker's key, worker_<id>.key from flq credentials: every call is signed with it "
        "(default $FLQ_CREDENTIAL)",
    )
    p.add_argument("--certfile", default=None, help="client certificate (PEM) for a master that requires one")
    p.add_argument("--keyfile", default=None, help="the client certificate's private key (PEM)")
    p.add_argument(
        "--give_up_s",
        type=float,
        default=300.0,
        help="exit (status 7) after the master did not answer this long (seconds, default 300)",
    )
    p.add_argument(
        "--state_dir",
        default=DEFAULT_STATE_DIR,
        metavar="DIR",
        help=f"folder where the worker keeps its state (mirrors, error-feedback residual, lazy clock, "
        f"random streams) after every round, as flq_worker_<id>.npz, and reloads it when restarted "
        f"in the same run (default ./{DEFAULT_STATE_DIR}; '' = do not keep it)",
    )
    p.add_argument(
        "--no_state",
        action="store_true",
        help="do not keep the worker's state: a restarted worker gets its mirrors from the master and "
        "starts its residual and clock afresh (same as --state_dir '')",
    )
    p.add_argument("--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser(
        "credentials",
        help="make per-worker credentials: the master's secret and one key per worker (and, with --tls, "
        "a CA and certificates)",
    )
    p.add_argument("--workers", type=int, required=True, help="worker ids 0..N-1 get a key")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write them to (made 0700)")
    p.add_argument("--tls", action="store_true", help="also a CA, the master's certificate and one per worker")
    p.add_argument(
        "--master-host",
        action="append",
        default=None,
        metavar="NAME",
        help="--tls: a host name or address the master's certificate is valid for (repeat; default "
        "127.0.0.1 and localhost)",
    )
    p.add_argument("--days", type=int, default=365, help="--tls: days the certificates are valid (default 365)")
    p.add_argument("--force", action="store_true", help="replace existing files (old keys stop working)")
    p.set_defaults(func=cmd_credentials)

    from . import doctor

    p = sub.add_parser(
        "sweep",
        help="a grid of simulations (modes x bits x seeds ...), each in a process of its own, then a summary",
        description="Run every combination of a sweep file's grid as its own `flq simulate` (a Ray task, or a "
        "local pool of processes), each in OUT/<run>/ with its spreadsheet, log and model; runs done before "
        "are skipped; a failed run is reported and the others go on. Then OUT/summary.csv, OUT/summary.xlsx "
        "and the comparison figures OUT/plots/sweep_*.png. Exit 0 when every run completed, 1 when any failed. "
        "The file's format: README, Backends: one process or Ray, and sweeps.",
    )
    p.add_argument("sweep", metavar="SWEEP.json", help="the sweep file")
    p.add_argument("--out", default=None, help="output folder (default: the file's 'out', else results/sweep_<stem>)")
    p.add_argument(
        "--backend",
        choices=("auto", "ray", "local"),
        default="auto",
        help="ray: a Ray task per run; local: a pool of processes here; auto (default): ray when installed",
    )
    p.add_argument(
        "--parallel",
        type=int,
        default=0,
        help="local: runs at a time (default 0: CPUs / --threads, one with --threads 0)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="PyTorch threads of each run unless the sweep sets threads (default 1; 0 = all cores)",
    )
    p.add_argument("--ray_address", default=None, metavar="ADDR", help="an existing Ray cluster (default: start one)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("doctor", help="check Python, PyTorch, CUDA, the device, the dataset, the config and the master")
    doctor.add_arguments(p)
    p.set_defaults(func=doctor.run)

    p = sub.add_parser(
        "plot",
        help="figures comparing runs from their spreadsheets",
        description="Draw figures comparing runs (one line per run, labelled by mode, bits and the config keys "
        "that differ between the runs) as OUT/NAME_<figure>.png: entropy_vs_round, acc_vs_round, entropy_vs_bits, "
        "acc_vs_bits, acc_vs_uplink_bits, selected_per_round and, per bin run, binary_uploads_<label>. "
        "NAME defaults to the spreadsheet's stem for one run (what `flq simulate --plot` writes) and to "
        "compare_<modes>_<hash of the spreadsheets' paths> for several, so other runs never replace these "
        "figures; plotting the same spreadsheets again redraws the same files.",
    )
    p.add_argument("results", nargs="+", help="flq_results_*.xlsx files")
    p.add_argument("--out", default="results/plots", help="output folder (default results/plots)")
    p.add_argument(
        "--name",
        default=None,
        help="file name prefix of the figures (default: the spreadsheet's stem for one run, "
        "compare_<modes>_<8 hex digits> for several); a figure of the same name is replaced",
    )
    p.set_defaults(func=cmd_plot)

    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with outcome.signals_interrupt():  # the commands refine this; before they do, a signal ends cleanly
            return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"flq: config error: {exc}", file=sys.stderr)
        return outcome.EXIT_CONFIG
    except outcome.Interrupted as exc:
        print(
            f"flq {args.command}: {exc.reason.upper()} during start-up, before any round: nothing to write",
            file=sys.stderr,
        )
        return outcome.exit_status(exc.reason)
    except KeyboardInterrupt:
        print("flq: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print(
            "flq: error: out of memory (fewer total_workers, a smaller batch_size or eval_batch_size?)", file=sys.stderr
        )
        return 2
    except Exception as exc:  # one line for expected failures (missing data, bad device)
        from .checkpoint import CheckpointError
        from .datasets import DatasetError

        if isinstance(exc, (DatasetError, CheckpointError, RuntimeError, OSError)):
            from .outputs import one_line

            print(f"flq: error: {one_line(exc)}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
