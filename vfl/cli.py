"""``vfl``: the command line. The only place that parses argv, sets up logging,
reads the environment and exits."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shutil
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from protocols.errors import ConfigError, VflError
from protocols.roles import Party, Role
from protocols.transport import tls
from psi.canon import DuplicatePolicy, IdType
from psi.protocol import PsiMode
from vfl.config import load_config
from vfl.data.datasets import data_dir, verify_all

logger = logging.getLogger("vfl")

EXAMPLES = """examples:
  vfl demo                                   three local services exchanging messages over mTLS
  vfl certs --demo certs/                    demo CA + key/cert for bank, retailer, arbiter
  vfl certs init-ca --out ca/                real mode, at the CA operator
  vfl certs request --id bank --role guest --out bank/   at each party (key never leaves it)
  vfl certs sign --ca-dir ca/ --csr bank/bank.csr --out bank/bank.pem
  vfl serve --config bank.toml               run a party's service
  vfl status --config bank.toml              ask it how it is
  vfl run job.toml --config bank.toml        submit a job and follow it (at the guest)
  vfl cancel credit-2026-12 --config bank.toml   stop a running job for good
  vfl ping --config bank.toml --peer retailer
  vfl psi --config bank.toml --peer retailer --data credit --id-column id
"""


def _party_arg(value: str) -> Party:
    pid, sep, role = value.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"{value!r}: use id:role, e.g. bank:guest")
    try:
        return Party(pid, Role.parse(role))
    except VflError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    p = argparse.ArgumentParser(
        prog="vfl",
        description="Vertical and transfer federated learning between two data silos.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    certs = sub.add_parser("certs", help="issue certificates (demo mode or real CA/CSR mode)")
    certs.add_argument(
        "--demo", type=Path, metavar="DIR", help="one-shot: CA + key/cert per party in DIR"
    )
    certs.add_argument(
        "--party",
        type=_party_arg,
        action="append",
        metavar="ID:ROLE",
        help="party for --demo (repeatable; default bank:guest retailer:host arbiter:arbiter)",
    )
    certs.add_argument(
        "--days", type=int, default=tls.DEFAULT_DAYS, help="validity of issued certificates"
    )
    csub = certs.add_subparsers(dest="certs_command", metavar="STEP")
    ca = csub.add_parser("init-ca", help="create the federation CA (at the CA operator)")
    ca.add_argument("--out", type=Path, required=True)
    ca.add_argument("--name", default="vfl federation CA")
    req = csub.add_parser("request", help="create this party's key and a CSR (in its own silo)")
    req.add_argument("--id", required=True, help="party id; becomes the certificate's DNS SAN")
    req.add_argument("--role", required=True, choices=[r.value for r in Role])
    req.add_argument("--out", type=Path, required=True)
    sign = csub.add_parser("sign", help="sign a party's CSR with the CA")
    sign.add_argument("--ca-dir", type=Path, required=True, help="folder with ca.pem and ca.key")
    sign.add_argument("--csr", type=Path, required=True)
    sign.add_argument("--out", type=Path, required=True)
    sign.add_argument("--days", type=int, default=tls.DEFAULT_DAYS, dest="sign_days")
    show = csub.add_parser("show", help="print a certificate's party, role, fingerprint, validity")
    show.add_argument("certificate", type=Path)

    serve = sub.add_parser("serve", help="run this party's service")
    serve.add_argument("--config", type=Path, required=True, help="party TOML config")
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="plaintext gRPC without authentication (local experiments only; logs a warning)",
    )

    status = sub.add_parser("status", help="ask this party's running service for its status")
    status.add_argument("--config", type=Path, required=True)

    ping = sub.add_parser("ping", help="have this party's service ping its peers")
    ping.add_argument("--config", type=Path, required=True)
    ping.add_argument("--peer", action="append", help="peer id (repeatable; default all peers)")
    ping.add_argument("--bytes", type=int, default=1024, help="body size of each PING")
    ping.add_argument("--rounds", type=int, default=3)

    psi = sub.add_parser(
        "psi",
        help="private set intersection with a peer (run at the guest)",
        description="Align this party's rows with a peer's by ECDH-PSI. Both parties write the "
        "intersection, in one shared row order, to <state_dir>/psi/<job_id>/.",
    )
    psi.add_argument("--config", type=Path, required=True)
    psi.add_argument("--peer", required=True, help="the host's party id")
    psi.add_argument("--data", required=True, help="this party's data alias ([data] in its config)")
    psi.add_argument("--id-column", default="id")
    psi.add_argument("--host-data", help="the host's data alias (default: same as --data)")
    psi.add_argument(
        "--host-id-column",
        help="the host's id column (default: the one its [psi] policy names; another is refused)",
    )
    psi.add_argument("--id-type", default="generic", choices=[t.value for t in IdType])
    psi.add_argument("--mode", default="both", choices=[m.value for m in PsiMode])
    psi.add_argument("--pad-to", type=int, help="pad both lists to this public size N_max")
    psi.add_argument("--duplicates", default="error", choices=[d.value for d in DuplicatePolicy])
    psi.add_argument("--timestamp-column", help="for --duplicates latest")
    psi.add_argument("--job-id", help="job id (default: a fresh one)")

    train = sub.add_parser(
        "run",
        aliases=["train"],
        help="run a training job (split NN, FedAvg or transfer) with its peers (at the guest)",
        description="Submit a job file (TOML) to this party's service. Its [job] type picks "
        "the kind: split_nn (the default; example: examples/three_parties/credit_job.toml) "
        "runs PSI first unless the job names one, trains encrypted, validates each epoch and "
        "scores the held-out test rows; horizontal (FedAvg with secure aggregation; example: "
        "examples/horizontal/credit_fedavg.toml); transfer (federated transfer learning to "
        "the host's other customers). Progress shows rows/s and ETA; `vfl cancel` stops a job.",
    )
    train.add_argument("job", type=Path, help="the job file (TOML)")
    train.add_argument("--config", type=Path, required=True, help="the guest's party config")
    train.add_argument(
        "--plaintext", action="store_true", help="allow plaintext = true (experiments only)"
    )
    train.add_argument("--no-wait", action="store_true", help="submit and return at once")

    cancel = sub.add_parser(
        "cancel",
        help="stop a running job for good (at the guest)",
        description="Stop the job's current run and record the job as failed ('cancelled by "
        "its operator'): the host and the arbiter are told and show it failed too, and the "
        "service does not resume it when it restarts. Prints the job's state once its run "
        "ended (a run busy with its PSI ends when the PSI does).",
    )
    cancel.add_argument("job_id", help="the job's id (as `vfl run` printed it)")
    cancel.add_argument("--config", type=Path, required=True, help="the guest's party config")

    estimate = sub.add_parser(
        "estimate",
        help="predict a job's run time before starting it",
        description="Measure this machine's primitive costs (about 2 s at 2048 bits) and "
        "apply them to the job's per-step operation counts (docs/protocol.md §4.9). The row "
        "count is the job's PSI result if it names one, else the guest's data rows (an upper "
        "bound on the intersection), unless --rows is given.",
    )
    estimate.add_argument("job", type=Path, help="the job file (TOML)")
    estimate.add_argument("--config", type=Path, required=True, help="the guest's party config")
    estimate.add_argument("--rows", type=int, help="aligned rows to assume")
    estimate.add_argument("--key-bits", type=int, default=2048, help="the arbiter's key size")
    estimate.add_argument("--json", action="store_true", help="print JSON instead of text")

    score = sub.add_parser(
        "score",
        help="score customers with a trained model (at the guest)",
        description="Online: --ids scores the named customers one request each (§5.1). "
        "Batch: --out scores every row of --data after a GUEST_ONLY PSI with the host "
        "(§5.2). The scores exist only here; customers the host does not hold get its "
        "default embedding.",
    )
    score.add_argument("--config", type=Path, required=True, help="the guest's party config")
    score.add_argument("--model", required=True, help="model id (= the training job's id)")
    score.add_argument("--data", required=True, help="data alias of the customers to score")
    score.add_argument("--id-column", default="id")
    score.add_argument("--id-type", default="generic", choices=[t.value for t in IdType])
    target = score.add_mutually_exclusive_group(required=True)
    target.add_argument("--ids", nargs="+", help="online: these customer ids")
    target.add_argument("--out", type=Path, help="batch: write the scores CSV here")
    score.add_argument("--decoys", type=int, default=0, help="online: decoy pseudonyms per id")

    data = sub.add_parser(
        "data",
        help="check this party's data for a job (or the bundled data sets)",
        description="With --config: read this party's own data as a job would and list every "
        "problem (file, 1-based line, column, what to do) and warning; nothing is sent to "
        "anyone. --job (the guest): the job file's guest data, label, classes and [guest] "
        "features. --alias (a host): that alias with its [psi] id column and its own "
        "[features.<alias>], warning about every binary column; --label-column also refuses "
        "a column named like a job's label. Exit status 1 if there is an error. Without "
        "--config: check the bundled data sets against their sha256 list.",
    )
    data.add_argument("action", choices=["check"])
    data.add_argument("--config", type=Path, help="this party's config")
    which = data.add_mutually_exclusive_group()
    which.add_argument("--job", type=Path, help="the guest: a split-NN job file (TOML)")
    which.add_argument("--alias", help="a host: one of its data aliases")
    data.add_argument("--label-column", help="with --alias: the jobs' label column name")
    data.add_argument("--json", action="store_true", help="print the report as JSON")

    report = sub.add_parser(
        "report",
        help="where a finished job's report is (at the guest), with its test metrics",
        description="Prints the folder of the job's report (report.json, roc.png, pr.png, "
        "calibration.png, loss.png, test_scores.csv with ids) in this party's state folder, "
        "and the test metrics it holds.",
    )
    report.add_argument("job_id", help="the job's id")
    report.add_argument("--config", type=Path, required=True, help="the guest's party config")

    demo = sub.add_parser("demo", help="run the three-party demo on this machine")
    demo.add_argument("--out", type=Path, default=Path(".demo"), help="working folder (recreated)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``vfl`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return _run(args)
    except VflError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    if args.command == "certs":
        return _certs(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "status":
        from vfl.client import Client

        print(json.dumps(Client(config=args.config).status(), indent=2))
        return 0
    if args.command == "cancel":
        from vfl.client import Client

        print(json.dumps(Client(config=args.config).cancel(args.job_id), indent=2))
        return 0
    if args.command == "ping":
        from vfl.service.admin import admin_call

        reply = admin_call(
            load_config(args.config),
            "ping",
            {"peers": args.peer or [], "bytes": args.bytes, "rounds": args.rounds},
        )
        print(json.dumps(reply, indent=2))
        return 1 if any("error" in r for r in reply["results"]) else 0
    if args.command == "psi":
        from vfl.service.admin import admin_call

        request = {
            "peer": args.peer,
            "data": args.data,
            "id_column": args.id_column,
            "id_type": args.id_type,
            "mode": args.mode,
            "pad_to": args.pad_to,
            "duplicates": args.duplicates,
            "timestamp_column": args.timestamp_column,
            "job_id": args.job_id,
        }
        if args.host_data:
            request["host_data"] = args.host_data
        if args.host_id_column:
            request["host_id_column"] = args.host_id_column
        print(
            json.dumps(
                admin_call(load_config(args.config), "psi", request, timeout=24 * 3600), indent=2
            )
        )
        return 0
    if args.command in ("run", "train"):
        return _train(args)
    if args.command == "estimate":
        return _estimate(args)
    if args.command == "score":
        from vfl.client import Client

        reply = Client(config=args.config).score(
            model=args.model,
            data=args.data,
            ids=args.ids,
            out=args.out,
            id_column=args.id_column,
            id_type=args.id_type,
            decoys=args.decoys,
        )
        print(json.dumps(reply, indent=2))
        return 0
    if args.command == "data" and args.config is not None:
        return _data_check(args)
    if args.command == "report":
        from vfl.service.datacheck import job_report

        folder, body = job_report(config=load_config(args.config), job_id=args.job_id)
        print(f"report of job {args.job_id}: {folder}")
        for name in sorted(p.name for p in folder.iterdir()):
            print(f"  {name}")
        print(json.dumps(body.get("metrics", {}), indent=2))
        return 0
    if args.command == "data":
        folder = data_dir(os.environ)
        for ds in verify_all(folder=folder):
            print(f"ok  {ds.name:36s} {ds.size:>9d} B  {ds.sha256}")
        return 0
    if args.command == "demo":
        from vfl.service.demo import run_demo

        if args.out.exists():
            shutil.rmtree(args.out)
        report = run_demo(args.out, data_folder=data_dir(os.environ), echo=print)
        print(f"demo finished; configs, logs and state are in {args.out}/; report: {report}")
        return 0
    raise AssertionError(args.command)  # pragma: no cover - argparse restricts commands


def _train(args: argparse.Namespace) -> int:
    from vfl.client import Client
    from vfl.service.progress import follow_job

    client = Client(config=args.config)
    job_id = client.submit(job=args.job, plaintext=bool(args.plaintext))
    print(f"job {job_id} submitted to {client.config.party.party_id}")
    if args.no_wait:
        return 0
    final = follow_job(client.config, job_id)
    print(json.dumps(final, indent=2))
    return 0 if final.get("state") == "done" else 1


def _estimate(args: argparse.Namespace) -> int:
    from vfl.client import Client
    from vfl.estimate.job import format_estimate

    found = Client(config=args.config).estimate(
        job=args.job, rows=args.rows, key_bits=args.key_bits
    )
    print(json.dumps(found.to_json(), indent=2) if args.json else format_estimate(found))
    return 0


def _certs(args: argparse.Namespace) -> int:
    if args.demo is not None:
        parties = args.party or [
            Party("bank", Role.GUEST),
            Party("retailer", Role.HOST),
            Party("arbiter", Role.ARBITER),
        ]
        paths = tls.create_demo_pki(args.demo, parties, days=args.days)
        print(f"CA: {args.demo / 'ca.pem'} (key {args.demo / 'ca.key'})")
        for pid, path in paths.items():
            print(f"{pid}: {path} (key {path.with_suffix('.key')})")
        return 0
    if args.certs_command == "init-ca":
        cert, key = tls.create_ca(args.out, name=args.name)
        print(f"CA certificate {cert} (share it with every party); CA key {key} (keep it offline)")
        return 0
    if args.certs_command == "request":
        key, csr = tls.create_key_and_csr(args.out, Party(args.id, Role.parse(args.role)))
        print(f"key {key} (stays here, owner-only); send {csr} to the CA operator")
        return 0
    if args.certs_command == "sign":
        pem = tls.sign_csr(
            csr_pem=args.csr.read_bytes(),
            ca_cert=args.ca_dir / "ca.pem",
            ca_key=args.ca_dir / "ca.key",
            days=args.sign_days,
        )
        args.out.write_bytes(pem)
        party = tls.party_of(pem)
        print(f"signed {party}: {args.out}; fingerprint {tls.fingerprint(pem)}")
        return 0
    if args.certs_command == "show":
        pem = args.certificate.read_bytes()
        print(f"party {tls.party_of(pem)}\nsha256 {tls.fingerprint(pem)}")
        try:
            tls.check_validity(pem, where=str(args.certificate))
            print("valid now")
        except VflError as exc:
            print(f"NOT VALID: {exc}")
            return 1
        return 0
    print(
        "vfl certs: give --demo DIR or one of init-ca, request, sign, show (see --help)",
        file=sys.stderr,
    )
    return 2


def _serve(args: argparse.Namespace) -> int:
    from vfl.service.party import PartyService

    config = load_config(args.config)
    service = PartyService(config, insecure=args.insecure)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        logger.info("received %s at %s", signal.Signals(signum).name, dt.datetime.now().isoformat())
        service.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    service.start()
    service.wait()
    return 0


def _data_check(args: argparse.Namespace) -> int:
    """``vfl data check --config ...`` (:mod:`vfl.service.datacheck`)."""
    from vfl.service.datacheck import check_alias_data, check_job_data

    config = load_config(args.config)
    if args.job is not None:
        report = check_job_data(config=config, job=args.job)
    elif args.alias is not None:
        report = check_alias_data(config=config, alias=args.alias, label_column=args.label_column)
    else:
        raise ConfigError("vfl data check --config needs --job (the guest) or --alias (a host)")
    print(json.dumps(report.to_json(), indent=2) if args.json else report.render())
    return 0 if report.ok else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
