"""A BERT embedding model through egpud as apps use it: the `openai` and `ollama` packages,
every vector compared with sentence-transformers' (engine/tests/fixtures/models/tiny-bert.ref.json,
from scripts/gen_tiny_bert.py). Prints one JSON object: the worst differences and what each
refusal said.

    python3 bert_check.py --base-url http://127.0.0.1:PORT/v1 --key KEY --ref FILE --model NAME
"""

import argparse
import json

import ollama
import openai


def max_abs_diff(a, b):
  assert len(a) == len(b), (len(a), len(b))
  return max(abs(x - y) for x, y in zip(a, b))


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--base-url", required=True)
  ap.add_argument("--key", required=True)
  ap.add_argument("--ref", required=True)
  ap.add_argument("--model", required=True)
  args = ap.parse_args()
  ref = json.load(open(args.ref))
  texts, name = ref["texts"], args.model
  client = openai.OpenAI(base_url=args.base_url, api_key=args.key, max_retries=0)
  o = ollama.Client(host=args.base_url.removesuffix("/v1"),
                    headers={"Authorization": f"Bearer {args.key}"})
  out = {}
  # One request for every text (the SDK's default base64, decoded by it).
  batch = client.embeddings.create(model=name, input=texts)
  assert [d.index for d in batch.data] == list(range(len(texts))), batch
  assert batch.usage.prompt_tokens == sum(len(ids) for ids in ref["input_ids"]), batch.usage
  out["openai_max_abs_diff"] = max(
    max_abs_diff(d.embedding, r) for d, r in zip(batch.data, ref["mean"]))
  # The request's texts shared passes; each is bit for bit what it is alone.
  alone = [client.embeddings.create(model=name, input=t, encoding_format="float").data[0].embedding
           for t in texts]
  out["batch_equals_alone"] = alone == [d.embedding for d in batch.data]
  e = o.embed(model=name, input=texts)
  out["ollama_max_abs_diff"] = max(max_abs_diff(v, r) for v, r in zip(e.embeddings, ref["mean"]))
  out["capabilities"] = o.show(name).capabilities
  # Longer than the 128 positions BERT learned: OpenAI refuses, Ollama cuts by default and
  # refuses when asked not to.
  long_text = " ".join(["the quick brown fox"] * 60)
  try:
    client.embeddings.create(model=name, input=long_text)
    out["openai_too_long"] = None
  except openai.BadRequestError as err:
    out["openai_too_long"] = str(err)
  cut = o.embed(model=name, input=long_text)
  out["ollama_truncated"] = {"vectors": len(cut.embeddings), "tokens": cut.prompt_eval_count}
  try:
    o.embed(model=name, input=long_text, truncate=False)
    out["ollama_no_truncate"] = None
  except ollama.ResponseError as err:
    out["ollama_no_truncate"] = str(err)
  # It embeds only.
  try:
    client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}])
    out["chat"] = None
  except openai.BadRequestError as err:
    out["chat"] = str(err)
  print(json.dumps(out))


if __name__ == "__main__":
  main()
