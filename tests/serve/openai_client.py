"""The official `openai` client against `tessera serve` (tests/serve.rs runs it).

Usage: openai_client.py BASE_URL MODEL

1. lists the models;
2. streams a chat completion and checks that the streamed pieces make the
   whole answer (the stream ends with `data: [DONE]`, which the client
   consumes);
3. load test: 64 concurrent clients, each bounded (its own prompt and
   max_tokens, greedy), against the same requests sent one at a time: no
   request is lost and each gets the same text;
4. an over-long request is a 400 (`openai.BadRequestError`).

Prints one JSON line with what it measured; exits 1 on a mismatch.
"""

import asyncio
import json
import sys
import time

import openai


def main() -> int:
    base, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base, api_key="unused")
    out = {}

    out["models"] = [m.id for m in client.models.list().data]

    messages = [{"role": "user", "content": "Capital of France?"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    pieces, roles, finish = [], [], None
    for chunk in client.chat.completions.create(
        model=model, messages=messages, max_tokens=24, temperature=0, stream=True
    ):
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        if delta.role:
            roles.append(delta.role)
        if delta.content:
            pieces.append(delta.content)
        finish = chunk.choices[0].finish_reason or finish
    out["chat"] = whole.choices[0].message.content
    out["chat_streamed"] = "".join(pieces)
    out["chat_stream_chunks"] = len(pieces)
    out["chat_roles"] = roles
    out["chat_finish"] = finish

    prompts = [f"client {i}: " + "ab" * (i % 5) for i in range(64)]
    lengths = [4 + i % 9 for i in range(64)]
    sequential = [
        client.completions.create(model=model, prompt=p, max_tokens=n, temperature=0).choices[0].text
        for p, n in zip(prompts, lengths)
    ]

    async def load():
        aclient = openai.AsyncOpenAI(base_url=base, api_key="unused", max_retries=0)

        async def one(p, n):
            r = await aclient.completions.create(model=model, prompt=p, max_tokens=n, temperature=0)
            return r.choices[0].text, r.usage.completion_tokens

        start = time.perf_counter()
        results = await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)), return_exceptions=True)
        return results, time.perf_counter() - start

    results, seconds = asyncio.run(load())
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    ok = [r for r in results if not isinstance(r, BaseException)]
    out["load_clients"] = len(prompts)
    out["load_answered"] = len(ok)
    out["load_errors"] = errors[:3]
    out["load_same_as_sequential"] = sum(1 for (t, _), s in zip(results, sequential) if not errors and t == s)
    out["load_tokens"] = sum(n for _, n in ok)
    out["load_seconds"] = round(seconds, 3)

    try:
        client.completions.create(model=model, prompt="x", max_tokens=100000)
        out["too_long"] = "accepted"
    except openai.BadRequestError as e:
        out["too_long"] = e.status_code

    print(json.dumps(out))
    good = (
        out["chat_streamed"] == out["chat"]
        and out["chat_roles"] == ["assistant"]
        and out["load_answered"] == 64
        and out["load_same_as_sequential"] == 64
        and out["too_long"] == 400
    )
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
