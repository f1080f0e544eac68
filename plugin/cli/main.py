"""The `radgate` command: one subcommand per job an operator has (serve, studies, run, ...)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from plugin.config import Config

# Nothing of the node is imported at module level, only in `main` and each command's function: a
# process that `radgate serve` spawns (a receiving process, a worker) re-imports the console
# script's module, and so this one, before it runs its own target; it must not pay for what it
# does not run (docs/design.md, "Start-up cost").

Command = Callable[[argparse.Namespace, "Config"], int]


def _add_config_options(p: argparse.ArgumentParser, default: object = None) -> None:
    """--config and --data-dir; a nested subcommand passes argparse.SUPPRESS so that its
    unset options do not overwrite those given before the subcommand's name."""
    p.add_argument(
        "--config", type=Path, default=default, help="YAML configuration file (default: embedded defaults)"
    )
    p.add_argument("--data-dir", type=Path, default=default, help="where the spool and the job database live")


def _config_from(args: argparse.Namespace) -> Config:
    from plugin.config import load_config

    config = load_config(getattr(args, "config", None))  # demo has no --config
    return config.with_overrides(
        data_dir=getattr(args, "data_dir", None),
        **{
            "dicom.port": getattr(args, "port", None),
            "dicom.ae_title": getattr(args, "ae_title", None),
        },
    )


def _cmd_serve(args: argparse.Namespace, config: Config) -> int:
    from plugin.node import serve

    return serve(config, execute=not args.no_executor)


def _cmd_worker(args: argparse.Namespace, config: Config) -> int:
    from plugin.node import serve

    return serve(config, listen=False)


def _cmd_studies(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.studies import print_studies

    return print_studies(config, as_json=args.json)


def _cmd_jobs(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.jobs import print_jobs, retry_command

    if args.jobs_command == "retry":
        return retry_command(config, args.job_id)
    return print_jobs(config, as_json=args.json)


def _cmd_deliveries(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.deliveries import print_deliveries, retry_command

    if args.deliveries_command == "retry":
        return retry_command(config, args.ids, args.all_dead)
    return print_deliveries(config, as_json=args.json, state=args.state)


def _cmd_fetch(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.fetch import fetch_command, print_fetches

    if args.list:
        return print_fetches(config, as_json=args.json)
    if args.source is None:
        print("radgate fetch: --source is required with --accession or --study", file=sys.stderr)
        return 2
    return fetch_command(
        config,
        args.source,
        study_uid=args.study,
        accession=args.accession,
        pipeline=args.pipeline,
        wait_s=args.wait,
    )


def _cmd_rules_check(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.rules import rules_check

    if args.pipelines is not None:  # named, not installed here: their series declarations are unknown
        available = {name.strip() for name in args.pipelines.split(",") if name.strip()}
        lookup = None
    else:
        from ai_models.registry import available_pipelines
        from plugin.route.pipelines import series_lookup

        available = set(available_pipelines())
        lookup = series_lookup(config)
    return rules_check(
        config, args.paths, available, destinations=args.destination, series_lookup=lookup, as_json=args.json
    )


def _cmd_run(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.run import command

    return command(args, config)


def _cmd_validate(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.validate import command

    return command(args, config)


def _cmd_web(args: argparse.Namespace, config: Config) -> int:
    from plugin.web.app import serve_web

    return serve_web(config)


def _cmd_users(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.users import command

    name = getattr(args, "name", None)
    return command(config, args.users_command, name, args.role, args.password_stdin, args.json)


def _cmd_audit_export(args: argparse.Namespace, config: Config) -> int:
    from plugin.cli.audit import export

    return export(config, args.since, studies=not args.no_studies)


def _cmd_demo(args: argparse.Namespace, config: Config) -> int:
    from plugin.demo.local import command

    return command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radgate",
        description="radgate: a DICOM AI node. Receives studies from a PACS, runs the AI pipeline "
        "that fits each one, and sends SEG, SR and SC results back into the archive.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the node: DICOM listener, spool, completion, jobs, web console (the main job)",
        description="Run the node: accept C-ECHO and C-STORE, write every instance durably to the spool "
        "and the job store before acknowledging it, and declare studies complete after a quiet period. "
        "With web.enabled (the default) it also serves the web console on web.host:web.port.",
    )
    _add_config_options(serve)
    serve.add_argument("--port", type=int, help="DICOM port (default 11112)")
    serve.add_argument("--ae-title", help="our AE title (default RADGATE)")
    serve.add_argument(
        "--no-executor", action="store_true", help="run no jobs here: `radgate worker` processes run them"
    )
    serve.set_defaults(func=_cmd_serve)

    demo = sub.add_parser(
        "demo",
        help="the main job shown on this machine: local Orthanc, the node, a synthetic CT, results back",
        description="Start a local Orthanc (Debian's) and `radgate serve` on free loopback ports, push a "
        "synthetic chest CT with DCMTK storescu, wait until the SEG, SR and SC are in Orthanc in the "
        "source study, and print what arrived, the measurements from the SR and Orthanc's URL (with "
        "--viewer, also the study's URL in OHIF Viewer, served on loopback against Orthanc's DICOMweb). "
        "Exit status 0 when the results came back, 1 with the reason otherwise.",
    )
    demo.add_argument("--keep", action="store_true", help="leave Orthanc and the node running until Ctrl-C")
    demo.add_argument(
        "--viewer",
        action="store_true",
        help="also serve OHIF Viewer against Orthanc's DICOMweb and print the study's URL (implies --keep)",
    )
    demo.add_argument(
        "--viewer-port",
        type=int,
        default=0,
        metavar="PORT",
        help="the viewer's loopback port (default: a free one)",
    )
    demo.add_argument("--dir", type=Path, help="keep Orthanc's and the node's data here (default: temp)")
    demo.add_argument("--rows", type=int, default=256, help="rows and columns of each slice (default 256)")
    demo.add_argument("--slices", type=int, default=80, help="number of slices (default 80)")
    demo.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the results")
    demo.set_defaults(func=_cmd_demo)

    worker = sub.add_parser(
        "worker",
        help="run jobs and send results, without a DICOM listener (beside the Orthanc plugin or serve)",
        description="Run the node without its DICOM listener: declare studies complete, route them, run "
        "their jobs on this machine's GPUs (or CPU) and send the results. Point it at the data dir and "
        "job store that a receiver (radgate serve, the Orthanc plugin) fills.",
    )
    _add_config_options(worker)
    worker.set_defaults(func=_cmd_worker)

    web = sub.add_parser(
        "web",
        help="run the web console, REST API and /metrics alone (beside the Orthanc plugin)",
        description="Serve the web console, its REST API and /metrics on web.host:web.port over the "
        "data dir and job store of the configuration, without a DICOM listener or jobs: beside the "
        "Orthanc plugin and `radgate worker`. `radgate serve` serves the console itself when "
        "web.enabled. Exit status 1 when it cannot listen.",
    )
    _add_config_options(web)
    web.set_defaults(func=_cmd_web)

    users = sub.add_parser(
        "users",
        help="the web console's users: add, list, remove, make an API token",
        description="Users of the web console and API, with a role: viewer (looks), operator (acts on "
        "studies, jobs, deliveries, rules, destinations) or admin (also the audit trail).",
    )
    users.set_defaults(func=_cmd_users, role="viewer", password_stdin=False, json=False)
    users_sub = users.add_subparsers(dest="users_command", required=True, metavar="USERS_COMMAND")
    users_add = users_sub.add_parser(
        "add",
        help="add a user (asks for the password twice, or reads one line of stdin)",
        description="Add a user with a role; the password (8 characters or more) is asked twice on "
        "the terminal, or read as one line of stdin with --password-stdin. Only its argon2 hash is kept.",
    )
    _add_config_options(users_add)
    users_add.add_argument("name", metavar="NAME")
    users_add.add_argument("--role", choices=["viewer", "operator", "admin"], default="viewer")
    users_add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    users_list = users_sub.add_parser(
        "list", help="list users, their roles and how many API tokens they have"
    )
    _add_config_options(users_list)
    users_list.add_argument("--json", action="store_true", help="print JSON instead of a table")
    users_remove = users_sub.add_parser("remove", help="remove a user, with their sessions and API tokens")
    _add_config_options(users_remove)
    users_remove.add_argument("name", metavar="NAME")
    users_token = users_sub.add_parser(
        "token",
        help="make an API token for a user (printed once; send it as Authorization: Bearer TOKEN)",
    )
    _add_config_options(users_token)
    users_token.add_argument("name", metavar="NAME")

    audit = sub.add_parser("audit", help="the audit trail: export it as JSON lines")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True, metavar="AUDIT_COMMAND")
    export = audit_sub.add_parser(
        "export",
        help="print the audit trail as JSON lines (redirect it to a file)",
        description="Print the audit trail, oldest first, one JSON object per line: logins, failed "
        "logins, logouts, refused requests, actions, configurations loaded, and the life of each "
        "study (received, complete, routed, job states, deliveries) read from the job store.",
    )
    _add_config_options(export)
    export.add_argument(
        "--since", type=datetime.fromisoformat, metavar="TIME", help="ISO 8601, UTC unless a zone is given"
    )
    export.add_argument("--no-studies", action="store_true", help="leave out each study's life")
    export.set_defaults(func=_cmd_audit_export)

    studies = sub.add_parser(
        "studies",
        help="list received studies: UID, instance count, state",
        description="List every study the node has received, with its instance count and state.",
    )
    _add_config_options(studies)
    studies.add_argument("--json", action="store_true", help="print JSON instead of a table")
    studies.set_defaults(func=_cmd_studies)

    jobs = sub.add_parser(
        "jobs",
        help="list jobs: study, pipeline, state, attempts, error, step times, deliveries; retry one",
        description="List every job: study UID, pipeline, state, attempts, the reason of a failure, "
        "seconds per step (load, infer, encode) and its deliveries per state.",
    )
    _add_config_options(jobs)
    jobs.add_argument("--json", action="store_true", help="print JSON instead of a table")
    jobs.set_defaults(func=_cmd_jobs, jobs_command=None)
    jobs_sub = jobs.add_subparsers(dest="jobs_command", metavar="JOBS_COMMAND")
    retry = jobs_sub.add_parser(
        "retry",
        help="re-queue a FAILED job, or the DEAD deliveries of a job",
        description="Re-queue a FAILED job (its attempts start again from 0) or, for a job that "
        "succeeded, its DEAD deliveries. Exit status 1 when there is nothing to retry.",
    )
    _add_config_options(retry, default=argparse.SUPPRESS)
    retry.add_argument("job_id", type=int, metavar="JOB_ID")

    deliveries = sub.add_parser(
        "deliveries",
        help="list result deliveries: SOP UID, destination, state, attempts, next attempt, last error",
        description="List every result delivery (one result instance to one destination): its job, "
        "SOP Instance UID, destination, state (PENDING, SENDING, SENT, DEAD), attempts, the next "
        "attempt and the last error.",
    )
    _add_config_options(deliveries)
    deliveries.add_argument("--json", action="store_true", help="print JSON instead of a table")
    deliveries.add_argument("--state", choices=["PENDING", "SENDING", "SENT", "DEAD"], help="only these")
    deliveries.set_defaults(func=_cmd_deliveries, deliveries_command=None)
    deliveries_sub = deliveries.add_subparsers(dest="deliveries_command", metavar="DELIVERIES_COMMAND")
    deliveries_retry = deliveries_sub.add_parser(
        "retry",
        help="re-queue DEAD deliveries (attempts start again from 0)",
        description="Re-queue DEAD deliveries: by id, or all of them with --all-dead. They become "
        "PENDING, due now, with their attempts reset. Exit status 1 when a named id is not DEAD.",
    )
    _add_config_options(deliveries_retry)
    deliveries_retry.add_argument("ids", nargs="*", type=int, metavar="ID", help="delivery ids")
    deliveries_retry.add_argument("--all-dead", action="store_true", help="every DEAD delivery")

    fetch = sub.add_parser(
        "fetch",
        help="pull a study from a configured source (PACS, DICOMweb) and run the rules or a pipeline",
        description="Ask the source (`sources` in the configuration) for the study by accession number "
        "or Study Instance UID and record a fetch request; the running node (`radgate serve`) "
        "retrieves it (C-MOVE to its own AE title, C-GET or WADO-RS), retrying with backoff while the "
        "source is down, and once the study is complete runs the rules on it, or only --pipeline. "
        "A source that cannot be reached now is retried by the node. --list shows the requests. Exit "
        "status 0 when recorded (with --wait: done), 1 when it failed or did not end in time (--wait) "
        "or the accession matches several studies, 2 for an unknown source or pipeline, 3 when the "
        "source holds no such study.",
    )
    _add_config_options(fetch)
    fetch.add_argument("--source", metavar="NAME", help="a source from the configuration's `sources`")
    what = fetch.add_mutually_exclusive_group(required=True)
    what.add_argument("--accession", metavar="A", help="the study's accession number")
    what.add_argument("--study", metavar="UID", help="the study's Study Instance UID")
    what.add_argument("--list", action="store_true", help="list the fetch requests and their state")
    fetch.add_argument("--pipeline", metavar="NAME", help="run only this pipeline (default: the rules)")
    fetch.add_argument(
        "--wait", type=float, metavar="SECONDS", help="wait this long for the request to be done or failed"
    )
    fetch.add_argument("--json", action="store_true", help="with --list: print JSON instead of a table")
    fetch.set_defaults(func=_cmd_fetch)

    rules = sub.add_parser(
        "rules",
        help="routing rules: check them with a dry run over DICOM files",
        description="Routing rules decide which pipeline runs on a series and where its results go.",
    )
    rules_sub = rules.add_subparsers(dest="rules_command", required=True, metavar="RULES_COMMAND")
    check = rules_sub.add_parser(
        "check",
        help="validate the rules and show, per series on disk, which rule matches and why others do not",
        description="Validate the rules against the installed pipelines and the configured destinations, "
        "then route every series found under PATH (headers only, nothing runs) and print, per series, "
        "the matching rule, its pipeline and destinations, and why each earlier rule did not match; "
        "for a study-scope rule, how its pipeline ranks the series it won and why each lost or was "
        "rejected. Exit status 2 for bad rules, 1 when no DICOM series was found.",
    )
    _add_config_options(check)
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="DICOM files or folders")
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.add_argument(
        "--destination",
        action="append",
        metavar="NAME",
        help="send to this configured destination instead of the rules' own (repeatable)",
    )
    check.add_argument(
        "--pipelines",
        metavar="NAMES",
        help="comma-separated pipeline names to check against instead of the installed ones (their "
        "series preferences are then unknown: study-scope rules rank in the common order)",
    )
    check.set_defaults(func=_cmd_rules_check)

    run = sub.add_parser(
        "run",
        help="run one pipeline on a folder of DICOM files, offline (no node needed)",
        description="Load the series in INPUT_DIR, run the pipeline and write findings.json, "
        "segments.npz and the DICOM results (SEG, SR, SC) to OUT_DIR. Exit status 1 with the reason "
        "when the series cannot be used.",
    )
    _add_config_options(run)
    run.add_argument("input_dir", type=Path, metavar="INPUT_DIR", help="folder with the files of one series")
    run.add_argument(
        "--pipeline", required=True, help="pipeline name: built in, installed, or from the --config pipelines"
    )
    run.add_argument("--out", type=Path, required=True, help="folder for findings.json, segments.npz, dicom/")
    run.add_argument("--option", action="append", metavar="KEY=VALUE", help="pipeline option (repeatable)")
    run.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    run.add_argument("--no-dicom", action="store_true", help="skip the SEG/SR/SC files")
    run.set_defaults(func=_cmd_run)

    validate = sub.add_parser(
        "validate",
        help="score a pipeline against reference segmentations of your own cases (Dice, HD95, volumes)",
        description="Run the pipeline on each CASE_DIR (the series `radgate run` would pick) and score "
        "its segments against the case's reference: an RTSTRUCT, a DICOM SEG, or a NIfTI label map on "
        "the series' grid. Give --reference once per case, in the order of the cases, or not at all: "
        "each case's reference is then the one RTSTRUCT or SEG file inside its folder, else the one "
        ".nii/.nii.gz file. Reference structures are paired with segments by code (segmented property "
        "type and laterality), else by name ('Lung L' = 'Left lung'), or as --map says. Prints Dice, "
        "95th-percentile Hausdorff distance (mm) and volumes per case and segment, and the mean and "
        "worst per segment. Exit status 0 when scored, 1 when a Dice is below --min-dice or the "
        "pipeline refused a case, 2 for input that cannot be scored (the reason is printed).",
    )
    _add_config_options(validate)
    validate.add_argument(
        "cases", nargs="+", type=Path, metavar="CASE_DIR", help="folder with one case's DICOM files"
    )
    validate.add_argument(
        "--pipeline", required=True, help="pipeline name: built in, installed, or from the --config pipelines"
    )
    validate.add_argument(
        "--reference",
        action="append",
        type=Path,
        metavar="REF",
        help="reference file of a case (RTSTRUCT, SEG, .nii/.nii.gz); repeat once per CASE_DIR, same order",
    )
    validate.add_argument(
        "--map",
        action="append",
        metavar="REFERENCE=SEGMENT",
        help="score this reference structure (ROI name, SEG segment label or number, NIfTI label value) "
        "against this segment (label or number); repeatable; when given, only these pairs are scored",
    )
    validate.add_argument(
        "--out", type=Path, help="write validation.json, validation.csv and validation-summary.csv here"
    )
    validate.add_argument(
        "--min-dice", type=float, metavar="X", help="exit status 1 when any Dice is below X"
    )
    validate.add_argument(
        "--option", action="append", metavar="KEY=VALUE", help="pipeline option (repeatable)"
    )
    validate.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    validate.set_defaults(func=_cmd_validate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from plugin.config import ConfigError
    from plugin.logs import setup_command_logging
    from plugin.store.engine import SchemaTooNew

    parser = build_parser()
    args = parser.parse_args(argv)
    setup_command_logging()
    try:
        config = _config_from(args)
    except ConfigError as err:
        print(f"radgate: {err}", file=sys.stderr)
        return 2
    func: Command = args.func
    try:
        return func(args, config)
    except SchemaTooNew as err:  # a command that opens the store (serve logs it itself)
        print(f"radgate: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
