"""`python -m llmrelay.serve.model_worker`: FastChat's model worker command, same flags."""

import argparse

from llmrelay.config import add_worker_args
from llmrelay.worker.main import run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmrelay.serve.model_worker",
                                     description="An llmrelay model worker (one model).")
    add_worker_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
