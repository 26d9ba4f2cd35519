"""The merge step's memory: the spliced CE of its evaluations stays bounded for large vocabularies.

Each merge evaluation runs :func:`spliced_ce` (clean, SAE-spliced and zero-spliced
forwards). Its logits are ``[predictions, vocab]``; float64 copies of all of them at once
grew the step by gigabytes on a 262k-vocabulary model. Peak RSS is measured in a fresh
process (``ru_maxrss`` is a high-water mark), after a warm-up call.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from integral_superposition.backends.tiny import tiny_model_dir

VOCAB, D_MODEL, TEXTS, MAX_LEN = 32768, 32, 16, 32

_SCRIPT = r"""
import json, resource, sys
import numpy as np, torch
torch.set_num_threads(1)
from integral_superposition.backends import load_backend
from integral_superposition.sae.metrics import spliced_ce
from integral_superposition.sae.model import SparseAutoencoder

model_dir, n_texts, max_len, vocab = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
backend = load_backend(model_dir)
backend.model.resize_token_embeddings(vocab)  # a large vocabulary: big logits, as in gemma
tok = backend.tokenizer
rng = np.random.default_rng(0)
words = [w for w in tok.get_vocab() if w.isalpha()][:2000]
texts = [" ".join(rng.choice(words, size=2 * max_len)) for _ in range(n_texts)]
sae = SparseAutoencoder(backend.d_model, 4 * backend.d_model, architecture="relu", seed=0)
spliced_ce(backend, sae, "layer.1", texts[:1], batch_size=1, max_len=max_len)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = spliced_ce(backend, sae, "layer.1", texts, batch_size=n_texts, max_len=max_len)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_kib": after - before, "n_predictions": out["n_predictions"],
                  "vocab": int(backend.model.config.vocab_size)}))
"""


@pytest.mark.timeout(120)
def test_spliced_ce_peak_memory_is_bounded_for_a_large_vocabulary():
    model_dir = tiny_model_dir("gemma", d_model=D_MODEL, n_layers=2)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(model_dir), str(TEXTS), str(MAX_LEN), str(VOCAB)],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    n_pred, vocab = res["n_predictions"], res["vocab"]
    assert n_pred >= TEXTS * (MAX_LEN - 4)  # long texts: nearly every position predicts
    one_f32 = n_pred * vocab * 4  # one float32 [P, vocab] copy of the selected logits
    # float64 copies of all three forwards' selected logits at once grew it by ~11x one_f32;
    # a forward's logits, the clean and one spliced selection and float64 blocks: ~4x
    assert res["growth_kib"] * 1024 < 6 * one_f32, res
