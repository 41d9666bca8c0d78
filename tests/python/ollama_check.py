"""Drives egpud's Ollama-compatible API with the official `ollama` package, as apps do.

Lists, shows, chats (streamed and not), generates, and unloads with keep_alive=0; prints one
JSON object for the Rust test. The key comes from OLLAMA_API_KEY, which the package sends as a
bearer token.

    OLLAMA_API_KEY=KEY python3 ollama_check.py --host http://127.0.0.1:PORT --model NAME
"""

import argparse
import json
import time

import ollama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", required=True)
    ap.add_argument("--model", required=True)
    args = ap.parse_args()
    client = ollama.Client(host=args.host)
    out = {}
    options = {"temperature": 0, "num_predict": 8}

    names = [m.model for m in client.list().models]
    assert args.model in names, names
    out["list"] = names

    shown = client.show(args.model)
    assert shown.details.format == "gguf", shown
    assert shown.modelinfo["general.architecture"] == "llama", shown.modelinfo
    out["show_family"] = shown.details.family

    reply = client.chat(model=args.model, messages=[{"role": "user", "content": "Say hello."}], options=options)
    assert reply.done and reply.message.role == "assistant", reply
    assert 0 < reply.eval_count <= 8 and reply.prompt_eval_count > 0, reply
    assert reply.total_duration >= reply.eval_duration > 0, reply
    out["chat"] = reply.message.content

    parts = list(
        client.chat(
            model=args.model, messages=[{"role": "user", "content": "Say hello."}], options=options, stream=True
        )
    )
    assert parts[-1].done and all(not p.done for p in parts[:-1]), parts
    out["chat_stream"] = "".join(p.message.content for p in parts)

    generated = client.generate(model=args.model, prompt="Say hello.", options=options)
    assert generated.done and generated.eval_count > 0, generated
    out["generate"] = generated.response

    running = [m.model for m in client.ps().models]
    assert args.model in running, running
    out["ps_before"] = running

    # keep_alive=0: the model leaves memory once this request is served.
    client.generate(model=args.model, prompt="Hi", options={"num_predict": 1}, keep_alive=0)
    deadline = time.monotonic() + 10
    while args.model in [m.model for m in client.ps().models]:
        assert time.monotonic() < deadline, "keep_alive=0 did not unload the model"
        time.sleep(0.05)
    out["ps_after"] = [m.model for m in client.ps().models]

    try:
        client.pull("llama3")
        raise AssertionError("a pull was accepted")
    except ollama.ResponseError as e:
        out["pull"] = e.error
    print(json.dumps(out))


if __name__ == "__main__":
    main()
