"""``fare-tiny``: deterministic tiny MoE models of real transformers architectures, offline.

``pretrained=fare-tiny`` (OLMoE) or ``pretrained=fare-tiny:<model_type>`` builds a randomly
initialised model from the real transformers config class of that family, plus a byte-level
tokenizer built locally (no download), and caches both on disk so later runs load them like any
local checkpoint. Same version + model_type => the same bytes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from fare_core.errors import FareError
from fare_core.files import normal_permissions

TINY_PREFIX = "fare-tiny"
#: Part of the on-disk cache directory name: bump it whenever the cached model or tokenizer changes, so
#: a stale cache is rebuilt instead of silently reused. v2: byte tokenizer pre-splits words (use_regex).
TINY_VERSION = "v2"
DEFAULT_TINY_TYPE = "olmoe"

_COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)

#: Tiny config overrides per supported family (8 experts, top-2; 16 experts in 4 groups for DeepSeek).
TINY_CONFIGS: dict[str, dict] = {
    "olmoe": dict(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        norm_topk_prob=True, head_dim=16,
    ),
    "qwen2_moe": dict(
        num_hidden_layers=3, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
        shared_expert_intermediate_size=64, norm_topk_prob=False,
    ),
    "mixtral": dict(num_hidden_layers=3, num_local_experts=8, num_experts_per_tok=2, head_dim=16),
    "ernie4_5_moe": dict(
        num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_intermediate_size=32,
        moe_num_shared_experts=1, moe_layer_start_index=1, moe_layer_interval=1,
    ),
    "deepseek_v2": dict(
        num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2,
        topk_method="group_limited_greedy", kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, num_key_value_heads=4,
    ),
    "deepseek_v3": dict(
        num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=2, moe_intermediate_size=32,
        n_shared_experts=1, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
        kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        num_key_value_heads=4,
    ),
    "gpt_oss": dict(
        num_hidden_layers=2, num_local_experts=8, num_experts_per_tok=2, head_dim=16,
        layer_types=["sliding_attention", "full_attention"], sliding_window=128,
    ),
}

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def is_tiny_spec(pretrained) -> bool:
    return isinstance(pretrained, str) and (pretrained == TINY_PREFIX or pretrained.startswith(TINY_PREFIX + ":"))


def parse_tiny_spec(spec: str) -> str:
    model_type = spec.partition(":")[2] or DEFAULT_TINY_TYPE
    if model_type not in TINY_CONFIGS:
        raise FareError(
            f"unknown fare-tiny architecture {model_type!r}; allowed: "
            + ", ".join(f"fare-tiny:{t}" for t in TINY_CONFIGS)
        )
    return model_type


def check_pretrained(pretrained) -> None:
    """A string ``pretrained`` must be a local directory or a well-formed hub id (FareError otherwise)."""
    if not isinstance(pretrained, str) or Path(pretrained).expanduser().is_dir():
        return
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(pretrained)
    except HFValidationError:
        raise FareError(
            f"pretrained={pretrained!r}: no such directory, and not a valid hub id "
            "(a hub id is org/name, e.g. allenai/OLMoE-1B-7B-0924)"
        ) from None


def resolve_pretrained(pretrained: str) -> tuple[str, str]:
    """(what from_pretrained should load, the model id to record) for any ``pretrained`` string.

    ``fare-tiny[:type]`` becomes its cached local directory and the id ``fare-tiny:<type>``;
    hub ids and paths pass through unchanged.
    """
    if is_tiny_spec(pretrained):
        model_id = f"{TINY_PREFIX}:{parse_tiny_spec(pretrained)}"
        return str(tiny_model_path(model_id)), model_id
    return pretrained, pretrained


def cache_root() -> Path:
    root = os.environ.get("FARE_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "fare_moe"


def build_tokenizer():
    """Byte-level tokenizer: ids 0 pad, 1 end-of-text, 2.. the 256 bytes. Encodes any text.

    Token ids are exactly ``byte + 2`` and each token's offsets cover the character its byte belongs
    to. The pre-tokenizer splits text into words with GPT-2's regex like real byte-level BPE
    tokenizers: with no merges this changes no ids or offsets, but it keeps the BPE word cache
    (up to 10,000 entries) holding short words instead of every whole distinct text it encoded, so
    memory does not grow with the number of distinct prompts.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    byte_chars = sorted(alphabet, key=lambda c: _BYTE_ORDER[c])
    vocab = {"<|pad|>": 0, "<|endoftext|>": 1}
    vocab.update({c: i + 2 for i, c in enumerate(byte_chars)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _bytes_to_unicode() -> dict[str, int]:
    """GPT-2's byte <-> printable-character table (char -> byte value)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTE_ORDER = _bytes_to_unicode()


def tiny_config(model_type: str):
    from transformers import AutoConfig

    overrides = {**_COMMON, **TINY_CONFIGS[model_type], "vocab_size": 258}
    overrides.update(bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return AutoConfig.for_model(model_type, **overrides)


def randomize_routers(model, seed: int = 0) -> None:
    """Give routers (and selection biases) spread-out random weights so routing is not near-tied."""
    import torch

    from .adapters import moe_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in moe_layers(model):
            w = layer.router.weight
            w.copy_(torch.randn(w.shape, generator=g) * (1.0 / w.shape[-1] ** 0.5))
            for _, b in layer.selection_biases:
                b.copy_(torch.rand(b.shape, generator=g) * 0.1)


def build_tiny_model(model_type: str = DEFAULT_TINY_TYPE, seed: int = 0):
    """A fresh tiny model (not cached), eval mode, fp32, eager expert dispatch."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(model_type)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    randomize_routers(model, seed)
    return model.eval()


def tiny_model_path(spec: str = TINY_PREFIX) -> Path:
    """Local directory holding the cached ``fare-tiny[:type]`` model and tokenizer (built if absent)."""
    model_type = parse_tiny_spec(spec)
    target = cache_root() / "tiny" / f"{model_type}-{TINY_VERSION}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_type}-", dir=target.parent))
    try:
        model = build_tiny_model(model_type)
        model.config.name_or_path = f"{TINY_PREFIX}:{model_type}"
        model.save_pretrained(tmp)
        build_tokenizer().save_pretrained(tmp)
        normal_permissions(tmp)  # mkdtemp and safetensors make 0700/0600; a shared cache must be readable
        try:
            os.replace(tmp, target)  # atomic publish; a concurrent builder may have won
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
