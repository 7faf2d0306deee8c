"""``python -m torchtune_gist.eval ...``: lm-eval's command line with the ``torchtune_gist`` model
registered and the shipped tasks on the include path. Takes exactly lm-eval's arguments
(``run``, ``ls``, ``validate``; a user's own ``--include_path`` is kept next to ours)."""

from lm_eval._cli import HarnessCLI
from lm_eval.utils import setup_logging

from torchtune_gist.eval import TASKS_DIR


def main() -> None:
    """Parse ``sys.argv`` with lm-eval's parser, add the task directory, run the subcommand."""
    setup_logging()
    parser = HarnessCLI()
    args = parser.parse_args()
    if hasattr(args, "include_path"):
        args.include_path = [str(TASKS_DIR)] + ([args.include_path] if args.include_path else [])
    parser.execute(args)


if __name__ == "__main__":
    main()
