"""A tiny Llama and byte-level BPE tokenizer, built locally in about a second, for tests and the demo.

There is no model hub here, so the tests and `finetune run --local --demo` fine-tune a model built by this
module and loaded through the real path (`from_pretrained` on a directory or an S3 prefix). The result is
deterministic: the same arguments give byte-identical files (seeded init, a BPE trained on a fixed corpus,
sorted JSON), so tests can hash it.

Every width is a multiple of 64, because bitsandbytes' 4-bit kernels on CPU assert otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)

#: A minimal chat template: role markers on their own line, `</s>` closes every assistant turn.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DATA_DIR = Path(__file__).parent / "data"


def default_corpus() -> Iterator[str]:
    """The bundled healthcare sample (train rows and glossary): the tokenizer's training text."""
    with open(DATA_DIR / "healthcare_train.jsonl", encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                row = json.loads(line)
                yield from (row["instruction"], row.get("input", ""), row["output"])
    yield from (DATA_DIR / "healthcare_glossary.txt").read_text(encoding="utf-8").splitlines()


def _check_widths(**widths: int) -> None:
    for name, value in widths.items():
        if value <= 0 or value % 64:
            raise ValueError(f"{name}={value} must be a positive multiple of 64 (bitsandbytes 4-bit on CPU)")


def build_tokenizer(corpus: Iterable[str], vocab_size: int, max_length: int):  # type: ignore[no-untyped-def]
    """A byte-level BPE trained on `corpus`, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tokenizer.train_from_iterator((text for text in corpus if text), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
        padding_side="right",
    )


def build_tiny_model(
    out_dir: str | Path,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 256,
    vocab_size: int = 512,
    max_position_embeddings: int = 1024,
    corpus: Iterable[str] | None = None,
    num_kv_heads: int | None = None,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny LlamaForCausalLM (safetensors) and its tokenizer to `out_dir`; returns the directory.

    `num_kv_heads` below `num_heads` gives grouped-query attention (default: as many as the heads);
    `tie_word_embeddings` shares one matrix between the input embeddings and the output head."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    _check_widths(hidden_size=hidden_size, intermediate_size=intermediate_size, vocab_size=vocab_size)
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads}")
    kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if kv_heads < 1 or num_heads % kv_heads:
        raise ValueError(f"num_kv_heads={kv_heads} must divide num_heads={num_heads}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(default_corpus() if corpus is None else corpus, vocab_size, max_position_embeddings)
    if len(tokenizer) > vocab_size:  # cannot happen with BpeTrainer(vocab_size), kept as a guard
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than vocab_size={vocab_size}")
    config = LlamaConfig(
        vocab_size=vocab_size,  # rows past len(tokenizer) are never produced; the width stays a multiple of 64
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        dtype="float32",
    )
    # Seeded init on the default generator, restored afterwards so callers' RNG state is unaffected.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
