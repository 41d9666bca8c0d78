"""Drives egpud's OpenAI-compatible API with the official `openai` package, as apps do.

Asserts what the package itself must see (streaming shapes, usage, errors as the package's own
exception types) and prints one JSON object with the texts, for the Rust test to compare with
egpuctl's output.

    python3 openai_check.py --base-url http://127.0.0.1:PORT/v1 --key KEY --model NAME --prompt P --max-tokens N
"""

import argparse
import json

import openai


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--key", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-tokens", type=int, required=True)
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0)
    messages = [{"role": "user", "content": args.prompt}]
    out = {}

    # Not streamed: usage always there; max_completion_tokens honoured.
    chat = client.chat.completions.create(
        model=args.model, messages=messages, temperature=0, max_completion_tokens=args.max_tokens
    )
    choice = chat.choices[0]
    assert chat.object == "chat.completion", chat
    assert choice.message.role == "assistant", choice
    assert chat.usage.completion_tokens <= args.max_tokens, chat.usage
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    out["chat"] = choice.message.content
    out["chat_tokens"] = chat.usage.completion_tokens
    out["chat_finish"] = choice.finish_reason

    # Streamed without include_usage: no usage anywhere.
    text, usages, finishes = "", [], []
    for chunk in client.chat.completions.create(
        model=args.model, messages=messages, temperature=0, max_tokens=args.max_tokens, stream=True
    ):
        assert chunk.object == "chat.completion.chunk", chunk
        usages.append(chunk.usage)
        for c in chunk.choices:
            text += c.delta.content or ""
            if c.finish_reason:
                finishes.append(c.finish_reason)
    assert all(u is None for u in usages), usages
    assert finishes == [out["chat_finish"]], finishes
    out["chat_stream"] = text

    # Streamed with include_usage: one last chunk with no choices and the usage; null before.
    chunks = list(
        client.chat.completions.create(
            model=args.model,
            messages=messages,
            temperature=0,
            max_tokens=args.max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage is not None, chunks[-1]
    assert all(c.usage is None for c in chunks[:-1]), chunks
    out["stream_usage"] = chunks[-1].usage.model_dump()

    # Legacy completions, whole and streamed.
    completion = client.completions.create(
        model=args.model, prompt="The capital of France is", max_tokens=6, temperature=0
    )
    assert completion.object == "text_completion" and completion.usage.completion_tokens <= 6
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=args.model, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == completion.choices[0].text, (streamed, completion)
    out["completion"] = completion.choices[0].text

    # Log-probabilities: the chosen token and its alternatives.
    with_logprobs = client.chat.completions.create(
        model=args.model, messages=messages, temperature=0, max_tokens=3, logprobs=True, top_logprobs=2
    )
    content = with_logprobs.choices[0].logprobs.content
    assert len(content) == with_logprobs.usage.completion_tokens, content
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content), content

    # The package's own exception types for egpud's errors.
    try:
        client.chat.completions.create(model="no-such-model", messages=messages)
        raise AssertionError("an unknown model was served")
    except openai.NotFoundError as e:
        out["not_found"] = str(e)
    bad = openai.OpenAI(base_url=args.base_url, api_key="wrong-key", max_retries=0)
    try:
        bad.chat.completions.create(model=args.model, messages=messages)
        raise AssertionError("a wrong key was accepted")
    except openai.AuthenticationError as e:
        out["bad_key"] = str(e)
    try:
        client.chat.completions.create(model=args.model, messages=messages, n=2)
        raise AssertionError("n=2 was accepted")
    except openai.BadRequestError as e:
        out["n2"] = str(e)

    models = [m.id for m in client.models.list()]
    assert args.model in models, models
    out["models"] = models
    print(json.dumps(out))


if __name__ == "__main__":
    main()
