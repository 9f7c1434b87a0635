"""Built-in checkpoints: small models built locally and deterministically.

They exist so that the whole serving path (tokenizer, vLLM loading, KV
transfer) runs on any machine without a model hub. Their weights are random,
except the default's: it is trained briefly on the Zen of Python (which ships
with Python), so its continuations of that text are recognisable. The real loading code is used unchanged: vLLM and transformers read it
like any other Hugging Face checkpoint directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

# Bump when the recipe changes, so cached checkpoints are rebuilt.
RECIPE_VERSION = 1
# What model.json's "model" says to mean this checkpoint.
DEFAULT_MODEL = "hetserve:tiny-zen"
BENCH_MODEL = "hetserve:bench-125m"


@dataclass(frozen=True, slots=True)
class TinyRecipe:
    name: str = "tiny-llama"
    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 2048
    max_position_embeddings: int = 2048
    # Larger than HF's 0.02 so that the random model's logits depend visibly on
    # its attention inputs (the KV tests rely on noise changing the output).
    initializer_range: float = 0.1
    seed: int = 0
    head_dim: int | None = None  # hidden_size // num_attention_heads unless set
    dtype: str = "float32"
    model_type: str = "llama"  # any transformers causal-LM model type
    tie_word_embeddings: bool = False
    extra: tuple[tuple[str, object], ...] = ()  # more config fields, (name, value) pairs
    train_steps: int = 0  # > 0: train on the Zen of Python (train_zen) instead of staying random

    @property
    def digest(self) -> str:
        blob = json.dumps({"v": RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


_WORDS = (
    "the a an of to in and or is are was were be been model token cache key value "
    "prefill decode server client request response stream batch layer head attention "
    "memory compute bandwidth latency throughput tensor shape block page copy send "
    "receive cancel error prompt text output input engine worker schedule queue time "
    "one two three four five six seven eight nine ten hello world quick brown fox "
    "jumps over lazy dog when where why how what which who this that these those"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        sentence = " ".join(words).capitalize()
        out.append(sentence + rng.choice([".", "?", "!", ",", ";"]) + f" {rng.randint(0, 999)}")
    return out


def zen_of_python() -> str:
    """The Zen of Python, as ``this`` ships it (ROT13) — text every Python has."""
    import codecs
    import this

    return codecs.decode(this.s, "rot13")


def train_zen(model, tokenizer, steps: int, seed: int) -> float:
    """Teach ``model`` to continue the Zen of Python; return the last loss.

    Deterministic: seeded crops, one thread. About half a minute on two cores.
    """
    import torch

    ids = torch.tensor(tokenizer(zen_of_python())["input_ids"])  # [N]
    generator = torch.Generator().manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    try:
        window = min(64, len(ids) - 1)
        for _ in range(steps):
            starts = torch.randint(0, len(ids) - window, (8,), generator=generator)
            starts[0] = 0  # the text's own beginning, as a prompt would start
            batch = torch.stack([ids[s : s + window] for s in starts.tolist()])  # [8, window]
            loss = model(input_ids=batch, labels=batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
        model.eval()
    return float(loss)


def _train_tokenizer(recipe: TinyRecipe, out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=recipe.vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = _corpus(recipe.seed)
    if recipe.train_steps:
        corpus += zen_of_python().splitlines() * 20
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)


def model_config(recipe: TinyRecipe, vocab_size: int | None = None):
    """The transformers config ``recipe`` builds (``vocab_size``: the tokenizer's, if larger)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(
        recipe.model_type,
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        vocab_size=max(vocab_size or 0, recipe.vocab_size),
        max_position_embeddings=recipe.max_position_embeddings,
        initializer_range=recipe.initializer_range,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        tie_word_embeddings=recipe.tie_word_embeddings,
        dtype=recipe.dtype,
        **({"head_dim": recipe.head_dim} if recipe.head_dim else {}),
        **dict(recipe.extra),
    )


def _save_model(recipe: TinyRecipe, vocab_size: int, out_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    config = model_config(recipe, vocab_size)
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, recipe.dtype))
    if recipe.train_steps:
        from transformers import AutoTokenizer

        loss = train_zen(model, AutoTokenizer.from_pretrained(out_dir), recipe.train_steps, recipe.seed)
        logger.info("trained %s on the Zen of Python: %d steps, final loss %.3f", recipe.name, recipe.train_steps, loss)
    model.save_pretrained(out_dir, safe_serialization=True)


def build_tiny(out_dir: Path, recipe: TinyRecipe = TinyRecipe()) -> Path:
    """Write the checkpoint (config, safetensors, tokenizer) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _train_tokenizer(recipe, out_dir)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(out_dir))
    _save_model(recipe, max(vocab, recipe.vocab_size), out_dir)
    return out_dir


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "hetserve" / "models"


def default_model_path(recipe: TinyRecipe | None = None) -> Path:
    """The cached built-in checkpoint (the default one unless given), built on first use."""
    recipe = recipe or BUILTIN[DEFAULT_MODEL]
    target = cache_root() / f"{recipe.name}-{recipe.digest}"
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    logger.info("Building the built-in checkpoint %s in %s", recipe.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build aside and rename, so a concurrent or interrupted build never leaves
    # a half-written checkpoint at the cached path.
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_tiny(tmp, recipe)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# Built-in checkpoints by the name model.json or --model may give.
BUILTIN: dict[str, TinyRecipe] = {
    # The default: a tiny Llama trained for half a minute on the Zen of Python,
    # so that its continuations of that text can be checked by eye.
    DEFAULT_MODEL: TinyRecipe(name="tiny-llama-zen", train_steps=200, initializer_range=0.02),
    # KV per token exactly Llama-3-8B's (32 layers, 8 KV heads, head dim 128,
    # bf16: 128 KiB), everything else as small as vLLM allows: for `hetserve
    # bench kv`, which measures the hand-off, not the model.
    "hetserve:kv-llama3-8b-shape": TinyRecipe(
        name="kv-llama3-8b-shape",
        hidden_size=128,
        intermediate_size=128,
        num_hidden_layers=32,
        num_attention_heads=8,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=4096,
        dtype="bfloat16",
    ),
    # For benchmarks: 125 M parameters (Llama, 12 layers, hidden 768, GQA 12/4
    # heads, 32k vocabulary), random weights, bf16: 250 MB of weights read per
    # decode step, so that decode is memory-bound on a CPU, as on a GPU.
    BENCH_MODEL: TinyRecipe(
        name="bench-llama-125m",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=4096,
        initializer_range=0.02,
        dtype="bfloat16",
    ),
}


def resolve_model(name: str) -> str:
    """A path or hub id as given, or the path of a built-in checkpoint (built on first use)."""
    recipe = BUILTIN.get(name)
    return str(default_model_path(recipe)) if recipe else name
