"""OpenAI's Responses API (`/v1/responses`): a translation at the edge into the pipeline's one
internal request (chat messages, tools, output constraint, sampling) and back."""
