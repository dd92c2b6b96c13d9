"""Command line: python -m data_fetch NAME [--dest DIR] [--url URL] [--hash HASH] [--quiet], or `list` (--list)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from data_fetch import DATA_ENV, SOURCES, FetchError, dataset_dir, default_data_dir, fetch
from data_fetch.interrupts import sigterm_as_interrupt, stop_status


def listing() -> str:
    """One block per dataset: name, description, default folder, checksum, URL."""
    lines = [f"data root: {default_data_dir()} (set MTLEARN_DATA to change it)", ""]
    for source in SOURCES.values():
        lines += [
            f"{source.name}",
            f"    {source.description}",
            f"    folder:   {dataset_dir(source.name)}",
            f"    checksum: {source.known_hash or 'none published (pin the sha256 printed after the first download)'}"
            + ("" if source.hash_is_official else " (pinned by another project, not by the publisher)"),
            f"    url:      {source.url}",
        ]
    return "\n".join(lines)


def unknown_name(name: str) -> str:
    """Why `name` is not one to fetch, and what to type instead."""
    stored = [source.name for source in SOURCES.values() if source.folder == name]
    if stored:  # busi_npz: load_dataset's name (and the folder) of one download per resolution
        return f"{name!r} is the folder (and load_dataset's name) of {' and '.join(stored)}: fetch one of those"
    return f"unknown dataset {name!r}; choose one of {', '.join(SOURCES)} (or 'list' to describe them)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_fetch",
        description="Download a public breast ultrasound dataset once, check its checksum and unpack it.",
        epilog="Data root: $MTLEARN_DATA, else the user cache.",
    )
    # checked below, not by argparse's choices: its "invalid choice" could not say that busi_npz is fetched as
    # busi_128 or busi_256; and --list, which people type, is taken too
    parser.add_argument("name", nargs="?", metavar="NAME", help=f"dataset to fetch ({', '.join(SOURCES)}), or 'list'")
    parser.add_argument("--list", action="store_true", help="describe the datasets (the same as NAME 'list')")
    parser.add_argument(
        "--dest", default=None, help="folder for this dataset (default: <data root>/<folder>)"
    )
    parser.add_argument("--url", default=None, help="download from this URL (a mirror) instead of the pinned one")
    parser.add_argument(
        "--hash", dest="known_hash", default=None, help="expected checksum, 'sha256:<hex>' or 'md5:<hex>'"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):  # a path cp1252 cannot spell (Windows, to a file): \u0141, not an error
        sys.stdout.reconfigure(errors="backslashreplace")
    if args.name is None and not args.list:
        parser.error("the following argument is required: NAME (a dataset, or 'list')")
    if args.name not in (*SOURCES, "list", None):
        parser.error(unknown_name(args.name))
    if args.list or args.name == "list":
        try:
            print(listing(), flush=True)
        except BrokenPipeError:  # `python -m data_fetch list | head`: the reader stopped early, as it may
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # else the flush at exit fails again
        return 0
    try:
        with sigterm_as_interrupt():  # a scheduler's or `kill`'s SIGTERM, said as Ctrl-C is
            folder = fetch(args.name, dest=args.dest, url=args.url, known_hash=args.known_hash,
                           progress=not args.quiet)
    except (FetchError, ValueError) as error:
        print(f"data_fetch: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as stop:  # the transfer keeps its .part file; an unpacking starts over next time
        what, status = stop_status(stop)
        print(f"\ndata_fetch: {what}; run the same command again to resume ({args.name} is not marked "
              "ready until it finishes)", file=sys.stderr)
        return status
    except OSError as error:  # the destination: a file where a folder should be, no permission, disk full
        where = error.filename or args.dest or dataset_dir(args.name)
        # without --dest the folder came from $MTLEARN_DATA (or the cache), which the user may not think of
        elsewhere = "choose another --dest" if args.dest else f"set {DATA_ENV} to a folder, or pass --dest"
        remedy = f"free some space or {elsewhere}" if error.errno in (errno.ENOSPC, errno.EDQUOT) else elsewhere
        blocker = next((p for p in (Path(where), *Path(where).parents) if p.exists() and not p.is_dir()), None)
        reason = error.strerror or (os.strerror(error.errno) if error.errno else error)  # fetch's own have no strerror
        problem = f"{blocker} is a file, not a folder" if blocker is not None else reason
        print(f"data_fetch: cannot write to {where} ({problem}); {remedy}", file=sys.stderr)
        return 1
    print(f"{args.name} is ready in {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
