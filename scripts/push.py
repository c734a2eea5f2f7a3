"""Push a saved student folder to the Hub: after a failed push, or for a run trained without push_to_hub.

    python scripts/push.py --folder outputs/student --repo_id <user>/<student-name> [--revision <branch>] [--private]

The token is huggingface_hub's (``HF_TOKEN`` or ``hf auth login``). Checkpoints and any ``teacher*`` file
are left out; the model card is titled with the repository's name (see ``hf_kd.hub.push_student``).
"""

import argparse
import sys

from hf_kd.hub import HubPushError, push_student
from hf_kd.redact import redact_logs_and_errors


def main(argv: list[str] | None = None) -> None:
    redact_logs_and_errors()  # no secret in a log line or an error's traceback
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", required=True, help="The saved student (output_dir of the run).")
    parser.add_argument("--repo_id", required=True, help="Hub model repository, e.g. <user>/<student-name>.")
    parser.add_argument("--revision", default=None, help="Branch to push to (created if needed).")
    parser.add_argument("--private", action="store_true", help="Create the repository private.")
    args = parser.parse_args(argv)
    try:
        commit = push_student(args.folder, args.repo_id, private=args.private or None, revision=args.revision)
    except (HubPushError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")
    print(f"pushed {args.folder} to {args.repo_id}: {commit}")


if __name__ == "__main__":
    main()
