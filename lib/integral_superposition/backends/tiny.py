"""Tiny random models of each supported family, built offline from configs.

``tiny:<family>`` (e.g. ``tiny:gemma``) is a valid ``model_id_or_path`` everywhere: the model
is built once with a fixed seed and a BPE tokenizer trained on the demo corpus, and saved
under ``$ISUP_CACHE/tiny``. They make fast tests and the ``smoke`` preset; their weights are
random, so their activations carry no meaning.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

FAMILIES = ("gemma", "llama", "mistral", "qwen", "gpt2", "gpt_neox", "bert")
_VERSION = 1


def _config(family: str, vocab: int, d: int, layers: int):
    import transformers as tf

    common = {"vocab_size": vocab, "max_position_embeddings": 128}
    if family == "gemma":
        return tf.Gemma3TextConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=d // 4,
            sliding_window=16,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if family == "llama":
        return tf.LlamaConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if family == "mistral":
        return tf.MistralConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=None,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if family == "qwen":
        return tf.Qwen2Config(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if family == "gpt2":
        return tf.GPT2Config(
            n_embd=d,
            n_layer=layers,
            n_head=4,
            n_positions=128,
            vocab_size=vocab,
            bos_token_id=1,
            eos_token_id=1,
        )
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            bos_token_id=1,
            eos_token_id=2,
            **common,
        )
    if family == "bert":
        return tf.BertConfig(
            hidden_size=d,
            intermediate_size=2 * d,
            num_hidden_layers=layers,
            num_attention_heads=4,
            pad_token_id=0,
            **common,
        )
    raise ValueError(f"family={family!r}: expected one of {FAMILIES}")


def _tokenizer(family: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from integral_superposition.data.demo_corpus import demo_corpus

    if family == "bert":
        specials = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    elif family == "gpt2":
        specials = ["<pad>", "<|endoftext|>", "<unk>"]
    else:
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token=specials[-1] if family != "bert" else "[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_corpus(4000)["title"].tolist(), trainer)
    if family == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 1), ("[SEP]", 2)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            unk_token="[UNK]",
            mask_token="[MASK]",
        )
    if family == "gpt2":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<|endoftext|>",
            eos_token="<|endoftext|>",
            unk_token="<unk>",
        )
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )


def tiny_model_dir(
    family: str = "gemma", d_model: int = 64, n_layers: int = 4, vocab: int = 512, seed: int = 0
) -> Path:
    """Build (once) and return the directory of a tiny random model of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"family={family!r}: expected one of {FAMILIES}")
    from integral_superposition.config import cache_root

    key = hashlib.sha256(
        json.dumps([_VERSION, family, d_model, n_layers, vocab, seed]).encode()
    ).hexdigest()[:12]
    target = cache_root() / "tiny" / f"{family}-{key}"
    if (target / "config.json").exists():
        return target
    import torch
    import transformers as tf

    tokenizer = _tokenizer(family, vocab)
    config = _config(family, len(tokenizer), d_model, n_layers)
    torch.manual_seed(seed)
    auto = tf.AutoModel if family == "bert" else tf.AutoModelForCausalLM
    model = auto.from_config(config)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
