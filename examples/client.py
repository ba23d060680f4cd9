"""The seed's client, unchanged but for base_url: non-stream, stream, multi-turn, models.

Run a stack first (`make up`), then: python examples/client.py [model]
"""

import sys

from openai import OpenAI

client = OpenAI(base_url="http://localhost:8000/v1", api_key="none")
model = sys.argv[1] if len(sys.argv) > 1 else client.models.list().data[0].id
print("models:", [m.id for m in client.models.list().data])

messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
]
r = client.chat.completions.create(model=model, messages=messages, max_tokens=64)
print("answer:", r.choices[0].message.content)

messages += [{"role": "assistant", "content": r.choices[0].message.content},
             {"role": "user", "content": "And of Italy?"}]
print("streamed: ", end="")
for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=64,
                                            stream=True):
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
