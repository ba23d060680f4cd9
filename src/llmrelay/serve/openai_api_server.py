"""`python -m llmrelay.serve.openai_api_server`: FastChat's API server command, same flags."""

import argparse

from llmrelay.api.app import run
from llmrelay.config import add_api_args


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m llmrelay.serve.openai_api_server",
                                     description="The llmrelay OpenAI-compatible API server.")
    add_api_args(parser)
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
