"""Cut the ROSITA shape (8 layers, 2 heads, FFN 512, embedding rank 128) from a real pretrained
BERT-base-sized model, print its summary, and check that it reloads through the stock
``AutoModelForSequenceClassification`` with identical logits.

    python examples/rosita_shape.py [--model mpnet|minilm] [--batches 8] [--data-dir DIR]

all-mpnet-base-v2 (12 layers, hidden 768) is the only BERT-base-sized checkpoint available offline
here; its first use extracts it into the user cache (about 440 MB). Heads and FFN neurons are
chosen by first-order Taylor importance from a few SST-2 batches with the task loss (the classifier
head is freshly initialised, so this shows the surgery, not a tuned student). Takes about 3 minutes
on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import rosita_fast
from rosita_fast.compress import compress
from rosita_fast.data import DynamicPaddingCollator, encode_examples, get_task, load_examples
from rosita_fast.models import minilm_path, mpnet_path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("mpnet", "minilm"), default="mpnet")
    parser.add_argument("--batches", type=int, default=8, help="SST-2 batches of 32 to score on")
    default_data = ROOT.parent / "shared" / "data" / "glue" / "SST-2"
    parser.add_argument("--data-dir", default=str(default_data))
    args = parser.parse_args()

    torch.manual_seed(0)
    path = mpnet_path() if args.model == "mpnet" else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    task = get_task("sst-2")
    examples = load_examples(task, "train", data_dir=args.data_dir)[: 32 * args.batches]
    data = encode_examples(examples, tokenizer, task, max_length=64)
    collate = DynamicPaddingCollator.for_tokenizer(tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=32, collate_fn=collate)

    dense = rosita_fast.count_parameters(model)
    layers = 8 if model.config.num_hidden_layers >= 8 else model.config.num_hidden_layers
    model.train()  # ROSITA scores with dropout on
    compress(model, layers=layers, heads=2, ffn=512, embedding_rank=128, batches=loader)
    model.eval()
    print(rosita_fast.summary(model))
    print(f"dense {dense:,} -> student {rosita_fast.count_parameters(model):,} parameters")

    batch = next(iter(loader))
    with torch.no_grad():
        before = model(**batch).logits
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp).eval()
        with torch.no_grad():
            after = reloaded(**batch).logits
    same = torch.equal(before, after)
    print(f"reloaded with {type(reloaded).__name__}: logits identical = {same}")


if __name__ == "__main__":
    main()
