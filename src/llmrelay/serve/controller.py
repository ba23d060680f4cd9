"""`python -m llmrelay.serve.controller`: FastChat's controller command, same flags."""

import argparse

from llmrelay.config import add_controller_args
from llmrelay.controller.app import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmrelay.serve.controller",
                                     description="The llmrelay controller (worker registry).")
    add_controller_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
