"""Test fixtures that need no network: a tiny random-weight causal LM with a tokenizer trained
on the spot, and a chat template. Used by the test suite and benchmarks.

The model is a 2-layer Llama (hidden 64, 2 heads of dim 32, so vLLM's CPU attention accepts
it) with two EOS ids (``<|eos|>`` and ``<|im_end|>``, Llama-3 style) and a BOS token. The EOS
rows of the output layer are aimed at the mean final hidden state so that rollouts end after
a few dozen steps instead of running into the length cap.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Natalia sold clips to 48 of her friends in April.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small village by the sea.",
    "How many apples are left if you eat three of seven?",
    "import numpy as np\nx = np.arange(10)\nprint(x.sum())",
    "She opened the door and saw the garden full of light.",
    "Question: What is 12 times 7? Answer: 84",
    "A man is sitting on a roof. He starts pulling up roofing.",
    "Write a story about a robot who learns to paint.",
] * 4

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(vocab_size: int = 320):
    """Train a byte-level BPE tokenizer on a small built-in corpus (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    bos_id = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    vocab_size: int = 320,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_position_embeddings: int = 512,
    eos_quantile: float = 0.01,
    chat_template: bool = True,
) -> Path:
    """Save a tiny random Llama + tokenizer to ``path`` (a normal HF folder) and return it.

    ``eos_quantile`` places each EOS logit near the ``1 - eos_quantile`` quantile of the other
    logits in a typical state (smaller = EOS ranks higher = earlier stops; 0.01 gives rollouts
    of a few dozen steps, 0.5 rollouts that run to the cap).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tokenizer = build_tiny_tokenizer(vocab_size)
    if not chat_template:
        tokenizer.chat_template = None
    eos_ids = [
        tokenizer.convert_tokens_to_ids("<|eos|>"),
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(25.0)  # logits of order 1: a non-trivial, peaked distribution
        ids = torch.randint(len(SPECIAL_TOKENS), len(tokenizer), (8, 64))
        hidden = model.model(input_ids=ids).last_hidden_state.reshape(-1, hidden_size)
        logits = hidden @ model.lm_head.weight.T
        # Aim each EOS row (least squares) at a high per-state quantile of the other logits.
        for k, eid in enumerate(eos_ids):
            target = torch.quantile(logits, 1.0 - eos_quantile / (k + 1), dim=1, keepdim=True)
            # float64 solve rounded to float32: LAPACK's float32 result varies run to run
            sol = torch.linalg.lstsq(hidden.double(), target.double()).solution
            model.lm_head.weight[eid] = sol[:, 0].float()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_ids,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
