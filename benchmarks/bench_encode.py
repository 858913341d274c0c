"""Encoding throughput against sentence-transformers, and peak memory of sharded encoding.

Part 1: ``ItemEmbedder.encode_texts`` vs ``SentenceTransformer.encode`` on the same model (the bundled
all-MiniLM-L6-v2), the same texts (Amazon Beauty titles + categories rendered as item prompts) and
the same batch size, interleaved and repeated in one run; prints texts/s of each and the ratio.

Part 2: peak resident memory (VmHWM, reset before encoding) of ``ItemEmbedder.encode(shard_dir=...)``
with a tiny random BERT over synthetic catalogues of 50,000 and 200,000 items, each in a fresh
process; the input table itself is built before the peak is reset, so the numbers are the
encoding's own footprint on top of the table.

    python benchmarks/bench_encode.py                       # full run (a few minutes on 2 cores)
    python benchmarks/bench_encode.py --n-texts 256 --repeats 1 --mem-sizes 2000,8000   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cfsr_head.data import default_data_dir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



def beauty_texts(n: int) -> list[str]:
    import pandas as pd

    from llm_item_embed import PromptTemplate

    path = default_data_dir() / "amazon_beauty" / "items.csv"
    if not path.is_file():
        raise SystemExit(f"{path} is missing; set CFSR_DATA_DIR to the datasets folder")
    df = pd.read_csv(path, dtype={"item_id": str})
    df = pd.concat([df] * (n // len(df) + 1), ignore_index=True).iloc[:n] if n > len(df) else df.iloc[:n]
    tmpl = PromptTemplate("This beauty product has the following attributes:",
                          {"title": "name", "categories": "category"})
    return [tmpl.render(r) for r in df.to_dict("records")]


def bench_speed(n_texts: int, batch_size: int, repeats: int) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from llm_item_embed import ItemEmbedder, default_model_path

    texts = beauty_texts(n_texts)
    ours = ItemEmbedder(lora=None, max_length=256, device="cpu")  # same weights as the peer, no adapter
    peer = SentenceTransformer(default_model_path(), device="cpu")
    peer.max_seq_length = 256
    n_tokens = sum(len(ids) for ids in ours.encoder.tokenizer(texts)["input_ids"])
    # warm-up + agreement check (the peer normalises its output: compare directions)
    a = ours.encode_texts(texts[:64], batch_size=batch_size)
    b = peer.encode(texts[:64], batch_size=batch_size)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    max_diff = float(np.abs(a - b).max())
    t_ours, t_peer = [], []
    for r in range(repeats):
        order = (("ours", "peer") if r % 2 == 0 else ("peer", "ours"))
        for who in order:
            t0 = time.perf_counter()
            if who == "ours":
                ours.encode_texts(texts, batch_size=batch_size, show_progress_bar=False)
                t_ours.append(time.perf_counter() - t0)
            else:
                peer.encode(texts, batch_size=batch_size, show_progress_bar=False)
                t_peer.append(time.perf_counter() - t0)
    res = {
        "n_texts": len(texts), "mean_tokens": n_tokens / len(texts), "batch_size": batch_size, "repeats": repeats,
        "torch_threads": torch.get_num_threads(), "max_abs_diff_normalised": max_diff,
        "ours_texts_per_s": len(texts) / statistics.median(t_ours),
        "peer_texts_per_s": len(texts) / statistics.median(t_peer),
    }
    res["ratio"] = res["ours_texts_per_s"] / res["peer_texts_per_s"]
    return res


# ---------------------------------------------------------------------------------------------- memory
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build_tiny_bert(out: Path) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from llm_item_embed import default_model_path

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(default_model_path())
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def memory_child(model_dir: str, n_items: int, shard_dir: str, shard_size: int, batch_size: int) -> dict:
    import numpy as np
    import pandas as pd
    import torch

    from llm_item_embed import ItemEmbedder, PromptTemplate

    torch.set_num_threads(1)  # a tiny model: one thread, no OpenMP barriers on a busy machine
    rng = np.random.default_rng(0)
    words = np.array("red blue nail hair serum cream soap lotion matte gloss dry oily shine glow".split())
    titles = [" ".join(words[rng.integers(0, len(words), size=6)]) for _ in range(n_items)]
    df = pd.DataFrame({"item_id": [f"I{i:07d}" for i in range(n_items)], "title": titles,
                       "price": rng.integers(100, 5000, size=n_items) / 100})
    emb = ItemEmbedder(model_dir, template=PromptTemplate("Item:", {"title": "name", "price": "price"}),
                       lora=None, max_length=32, device="cpu")
    _ = emb.encoder  # load the model before the measurement
    before = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM (peak RSS) to the current RSS
    t0 = time.perf_counter()
    E = emb.encode(df, batch_size=batch_size, shard_dir=shard_dir, shard_size=shard_size, show_progress_bar=False)
    checksum = float(np.asarray(E.matrix[:: max(1, n_items // 1000)]).sum())
    seconds = time.perf_counter() - t0
    peak = _rss_kib("VmHWM")
    return {"n_items": n_items, "rss_before_mib": before / 1024, "peak_mib": peak / 1024,
            "peak_minus_before_mib": (peak - before) / 1024, "seconds": seconds, "checksum": checksum}


def bench_memory(sizes: list[int], shard_size: int, batch_size: int) -> list[dict]:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-encode-") as tmp:
        model_dir = build_tiny_bert(Path(tmp) / "tiny-bert")
        for n in sizes:
            cmd = [sys.executable, __file__, "--memory-child", model_dir, str(n), str(Path(tmp) / f"shards-{n}"),
                   str(shard_size), str(batch_size)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-texts", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mem-sizes", default="50000,200000")
    p.add_argument("--shard-size", type=int, default=20000)
    p.add_argument("--threads", type=int, default=None, help="torch threads for the speed part (default: torch's)")
    p.add_argument("--skip-speed", action="store_true")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_child:
        model_dir, n, shard_dir, shard_size, batch_size = args.memory_child
        print(json.dumps(memory_child(model_dir, int(n), shard_dir, int(shard_size), int(batch_size))))
        return
    if not args.skip_speed:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        r = bench_speed(args.n_texts, args.batch_size, args.repeats)
        print(f"encode speed, all-MiniLM-L6-v2, {r['n_texts']} Amazon Beauty prompts "
              f"(mean {r['mean_tokens']:.1f} tokens), batch {r['batch_size']}, {r['repeats']} interleaved repeats, "
              f"{r['torch_threads']} torch threads")
        print(f"  llm_item_embed ItemEmbedder.encode_texts : {r['ours_texts_per_s']:8.1f} texts/s")
        print(f"  sentence-transformers encode            : {r['peer_texts_per_s']:8.1f} texts/s")
        print(f"  ratio (ours / peer)                     : {r['ratio']:.3f}x   "
              f"(max |diff| of normalised vectors {r['max_abs_diff_normalised']:.1e})")
    if not args.skip_memory:
        sizes = [int(s) for s in args.mem_sizes.split(",") if s]
        print(f"sharded encode peak memory, tiny random BERT (d=32), shard_size {args.shard_size}, fresh process each")
        for r in bench_memory(sizes, args.shard_size, args.batch_size):
            print(f"  {r['n_items']:>8} items: peak RSS {r['peak_mib']:7.1f} MiB "
                  f"(+{r['peak_minus_before_mib']:6.1f} MiB over the {r['rss_before_mib']:.1f} MiB before encoding), "
                  f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
