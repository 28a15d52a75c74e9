"""Tiny random-init causal LMs with a locally trained tokenizer, for tests, benchmarks and `make demo`.

The Hub is unreachable in CI, so the tests build their own models. The tokenizer splits every digit into its own
token (arithmetic becomes learnable in minutes on 2 cores), keeps `<think>`/`</think>` as single *non-special*
tokens (they stay in decoded text, as in R1-Distill) and carries a Qwen-style chat template with
`{% generation %}` markers, so TRL's assistant-only loss works. vLLM's CPU attention needs head_dim >= 32.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill.errors import DistillError

# Qwen2's pre-tokenizer pattern: `\p{N}` alone splits numbers into single digits.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_ADDED = ["<think>", "</think>"]
# Qwen2.5's ChatML layout. `{% generation %}` marks the tokens the assistant-only loss trains on; the
# end-of-turn token <|im_end|> is inside it, so the student learns to stop (open-r1 #603, #492, #520).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# `vllm.LLM` settings that serve a tiny model fast on a CPU (../shared/FACTS.md): no CUDA graphs, fp32 (bf16 is
# ~3x slower on CPUs without AMX), an explicit KV cache size (the start-up memory check misreads some NUMA reports).
CPU_ENGINE = {
    "enforce_eager": True,
    "dtype": "float32",
    "kv_cache_memory_bytes": 256 * 2**20,
    "max_model_len": 1024,
    "seed": 0,
}
DEFAULT_CORPUS = [
    "What is 12 + 35? Please reason step by step, and put your final answer within \\boxed{}.",
    "<think>\nFirst add the ones: 2 + 5 = 7. Then the tens: 1 + 3 = 4. So the sum is 47.\n</think>\n\n\\boxed{47}",
    "Let x be a real number such that x^2 - 5x + 6 = 0. Find the sum of all possible values of x.",
    "The answer is \\frac{3}{4}, so we have \\sqrt{2} \\cdot \\pi and (a, b) = (1, -2); therefore x = 7.",
    "Janet has 16 eggs. She eats three and bakes with four. How many dollars does she make at $2 each?",
]


def build_tiny_model(
    out: Path,
    *,
    arch: str = "qwen2",
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 2,
    vocab_size: int = 512,
    corpus: list[str] | None = None,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    vocab_rows: int | None = None,
) -> Path:
    """Write `config.json`, fp32 safetensors weights, tokenizer files and `generation_config.json` to `out`.
    `vocab_rows` pads the embedding rows past the tokenizer, as Qwen2.5-7B and up pad theirs to 152064."""
    if hidden_size % heads or hidden_size // heads < 32:
        raise DistillError(
            f"--hidden-size {hidden_size} / --heads {heads}: head_dim must be an integer >= 32 "
            "(vLLM's CPU attention supports 32, 64, 80, 96, 112, 128, ...)"
        )
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus or DEFAULT_CORPUS, vocab_size=vocab_size)
    tokenizer.save_pretrained(out)
    eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = AutoConfig.for_model(
        arch,
        vocab_size=vocab_rows or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    _pin_tokenizer_class(out)
    return out


def train_tokenizer(corpus: list[str], *, vocab_size: int):
    """A byte-level BPE with Qwen2's pre-tokenizer (which isolates every digit); returns a PreTrainedTokenizerFast.

    It must be Qwen2's exactly: transformers' AutoTokenizer re-creates a Qwen2 model's pre-tokenizer from its own
    pattern, so any other choice would tokenize differently in vLLM than in training."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tokenizer.add_tokens(PLAIN_ADDED, special_tokens=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def _pin_tokenizer_class(out: Path) -> None:
    """Make AutoTokenizer (which vLLM uses) load the fast tokenizer as saved, not Qwen2Tokenizer's re-creation
    that swaps in Qwen's own pre-tokenizer and would undo the digit splitting."""
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config, indent=2) + "\n")
