"""`amptrain search`: hyperparameters and precision with Optuna, on a fixed token budget."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from amptrain.cli.common import command_options, command_settings, config_from_args, print_ending
from amptrain.config import GRACE_PERIOD, HEARTBEAT_INTERVAL, SEARCH_BUDGET_STEPS, SEARCH_PRUNERS

SKIP = ("--max-steps", "--epochs", "--eval-every", "--log-every", "--checkpoint-every",
        "--keep-last", "--checkpoint-format")  # fmt: skip


def register(sub: Any) -> argparse.ArgumentParser:
    """Add the `search` parser."""
    opts = command_options(sub, "search", "search hyperparameters and precision with Optuna", SKIP)
    add = opts.add
    add("--trials", type=int, default=20,
        help="trials to finish; pruned and failed ones count (default: 20)")  # fmt: skip
    budget = opts.parser.add_mutually_exclusive_group()
    add("--budget-steps", group=budget, type=int, help="optimizer steps per trial")
    add("--budget-tokens", group=budget, type=int, help="training tokens per trial "
                        f"(default: {SEARCH_BUDGET_STEPS} steps' worth at --batch-size x "
                        "--grad-accum)")  # fmt: skip
    add("--space", type=Path, help="JSON/TOML search space keyed by train flag names "
        "(default: lr, batch-size, warmup, weight-decay, grad-accum, precision; flags given "
        "are fixed)")  # fmt: skip
    add("--objectives", default="val_loss",
        help="val_loss, or val_loss,tokens_per_s (default: val_loss)")  # fmt: skip
    add("--pruner", default="median", help="pruner of unpromising trials: "
        f"{', '.join(SEARCH_PRUNERS)} (default: median)")  # fmt: skip
    add("--study-name", help="study to create or resume; its run directory is OUT/search-NAME")
    add("--storage", help="journal file (default OUT/search-NAME/journal.log), an RDB URL "
        "(postgresql://user:pass@host/db) for workers on many machines, or env:VAR")  # fmt: skip
    add("--workers", type=int, default=1,
        help="processes working on the study on this machine (default: 1)")  # fmt: skip
    add("--heartbeat-interval", type=int, default=HEARTBEAT_INTERVAL, metavar="S",
        help="RDB storage: seconds between each worker's signs of life "
        f"(default: {HEARTBEAT_INTERVAL})")  # fmt: skip
    add("--grace-period", type=int, default=GRACE_PERIOD, metavar="S",
        help="RDB storage: seconds without a sign of life before a trial is failed and run "
        f"again once, its worker having died (default: {GRACE_PERIOD})")  # fmt: skip
    add("--no-baseline", action="store_true", help="do not run the base settings as trial 0")
    return opts.done(run)


def run(args: argparse.Namespace) -> int:
    """Search, write the run directory, print the table; 130 when interrupted."""
    import optuna

    from amptrain.search import command_space, open_run, redact, run_search
    from amptrain.search.report import console_table, write_outputs

    if not args.verbose:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    cfg = config_from_args(args)
    name, run_dir, storage = open_run(cfg, args.study_name, args.storage)
    space = command_space(cfg, args.space, given=vars(args))
    try:
        result = run_search(
            cfg, space=space, n_trials=args.trials, steps=args.budget_steps,
            tokens=args.budget_tokens, objectives=args.objectives.split(","),
            pruner=args.pruner, study_name=name, storage=storage, workers=args.workers,
            baseline=not args.no_baseline, progress=not args.no_progress,
            heartbeat_interval=args.heartbeat_interval, grace_period=args.grace_period,
        )  # fmt: skip
    except KeyboardInterrupt:
        where = f" --storage {redact(args.storage)}" if args.storage else ""
        print(f"amptrain: search interrupted; resume it with the same flags and --study-name "
              f"{name}{where}", file=sys.stderr)  # fmt: skip
        return 130
    # The storage URL may carry a password: config.json records the redacted one in `storage`.
    write_outputs(result, run_dir, cfg, command_settings(args, secret=("storage",)))
    lines = [console_table(result)]
    if result.best_command:
        lines.append(f"best trial as a training run: {result.best_command}")
    print_ending(lines, "run directory", run_dir)
    return 0
