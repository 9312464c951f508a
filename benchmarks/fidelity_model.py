"""The trained model bench_fidelity.py prunes: real text, a trained tokenizer, a fixed number of steps.

Every machine with Python has the same text: the standard library's own source. Its .py files
are split BY FILE (sha256 of the path relative to the library root) into train, calibration and
held-out sets, so no file contributes to two of them. A byte-level BPE tokenizer is trained with
the `tokenizers` library on the train split; a Qwen3-MoE (transformers' own class) is trained on
random windows of it for a fixed number of optimizer steps with a fixed seed, so the model does
not depend on how loaded the machine was (only the time it took does; it is recorded). The result
is saved with save_pretrained in small shards, like a hub checkpoint, under a cache directory keyed
by every option that changes it; a later run with the same options reuses it.

    python benchmarks/fidelity_model.py --out DIR [--steps N --aux-coef X ...]   # train one model
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

SPLITS = ("train", "calibration", "held_out")
CACHE_VERSION = 1  # bump when the recipe below changes what a given set of options produces


def model_options(args: argparse.Namespace) -> dict:
    """The options that determine the trained model (the cache key)."""
    return {"recipe": CACHE_VERSION, "python": sys.version.split()[0], "vocab": args.vocab,
            "layers": args.layers, "hidden": args.hidden, "experts": args.experts, "top_k": args.top_k,
            "expert_hidden": args.expert_hidden, "seq_len": args.seq_len, "batch": args.batch,
            "steps": args.steps, "lr": args.lr, "aux_coef": args.aux_coef, "seed": args.seed,
            "threads": args.threads}


def add_model_options(ap: argparse.ArgumentParser, several: bool = False) -> None:
    """The model's options; with `several`, --aux-coef takes comma-separated values (one model each)."""
    g = ap.add_argument_group("the trained model (changing one trains another, cached separately)")
    g.add_argument("--steps", type=int, default=400, help="optimizer steps (fixed: the model is reproducible)")
    g.add_argument("--aux-coef", type=str if several else float, default="0.001,0.1" if several else 0.001,
                   help="router_aux_loss_coef, the load-balancing loss (transformers' default 0.001; larger routes "
                        "closer to evenly)" + ("; comma-separated: one model and table each" if several else ""))
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--hidden", type=int, default=128)
    g.add_argument("--experts", type=int, default=32)
    g.add_argument("--top-k", type=int, default=4)
    g.add_argument("--expert-hidden", type=int, default=64, help="moe_intermediate_size")
    g.add_argument("--vocab", type=int, default=4096)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--batch", type=int, default=16)
    g.add_argument("--lr", type=float, default=3e-3)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=1,
                   help="torch threads while training (part of the key: the sums' order, so the bits, follow it)")


def cache_key(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- text


def stdlib_files() -> list[Path]:
    """The standard library's .py files (no site-packages: those differ between machines), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "/site-packages/" in rel:
            continue
        files.append(p)
    return files


def split_of(rel: str) -> str:
    """train 90%, calibration 5%, held-out 5% of the files, by a hash of the file's path."""
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:4], "big") % 100
    return "train" if h < 90 else "calibration" if h < 95 else "held_out"


def split_files() -> dict[str, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[Path]] = {s: [] for s in SPLITS}
    for p in stdlib_files():
        out[split_of(p.relative_to(root).as_posix())].append(p)
    return out


def read_text(p: Path) -> str | None:
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def train_tokenizer(files: list[Path], vocab: int, out: Path):
    """Byte-level BPE on (the first ~24 MB of) the train split, saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    def texts():
        total = 0
        for p in files:
            t = read_text(p)
            if t:
                total += len(t)
                yield t
            if total > 24_000_000:
                return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts(), trainer=trainer)
    tok.save(str(out))
    return tok


def encode_files(tok, files: list[Path]) -> list[list[int]]:
    docs = []
    for p in files:
        t = read_text(p)
        if t and t.strip():
            docs.append(tok.encode(t).ids)
    return docs


def write_windows(path: Path, docs: list[list[int]], length: int, limit: int) -> int:
    """Rows of `length` consecutive ids (each file cut into windows, in file order), at most `limit`."""
    n = 0
    with open(path, "w") as f:
        for ids in docs:
            for i in range(0, len(ids) - length + 1, length):
                f.write(json.dumps({"input_ids": ids[i:i + length]}) + "\n")
                n += 1
                if n >= limit:
                    return n
    return n


# --------------------------------------------------------------------------- model


def build_and_train(args: argparse.Namespace, out: Path) -> dict:
    import torch
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rnd = random.Random(args.seed)
    t0 = time.perf_counter()
    splits = split_files()
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(splits["train"], args.vocab, out / "tokenizer.json")
    eos = tok.token_to_id("<|endoftext|>")
    stream: list[int] = []
    for ids in encode_files(tok, splits["train"]):
        stream.extend(ids)
        stream.append(eos)
    data = torch.tensor(stream, dtype=torch.long)
    t_data = time.perf_counter() - t0
    print(f"data: {len(splits['train'])} train files, {len(stream):,} tokens ({t_data:.0f} s)", flush=True)

    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_hidden * 4,
        moe_intermediate_size=args.expert_hidden, num_hidden_layers=args.layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=args.hidden // 4, num_experts=args.experts,
        num_experts_per_tok=args.top_k, norm_topk_prob=True, router_aux_loss_coef=args.aux_coef,
        output_router_logits=True, max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos)
    try:  # transformers' grouped expert kernels: ~3x faster than the default on CPU for training
        model = Qwen3MoeForCausalLM._from_config(config, experts_implementation="grouped_mm")
    except (TypeError, ValueError):
        model = Qwen3MoeForCausalLM(config)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))))

    t1 = time.perf_counter()
    losses = []
    for step in range(args.steps):
        starts = [rnd.randrange(len(data) - args.seq_len - 1) for _ in range(args.batch)]
        batch = torch.stack([data[s:s + args.seq_len] for s in starts])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        outp = model(input_ids=batch, labels=batch)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(outp.loss.item())
        if step % 50 == 0 or step == args.steps - 1:
            recent = sum(losses[-50:]) / len(losses[-50:])
            print(f"step {step + 1}/{args.steps} loss {recent:.3f} ({time.perf_counter() - t1:.0f} s)", flush=True)
    train_s = time.perf_counter() - t1

    model.eval()
    model.config.output_router_logits = False
    model.save_pretrained(out, max_shard_size="4MB")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                            bos_token="<|endoftext|>").save_pretrained(out)
    info = {"options": model_options(args), "train_files": len(splits["train"]), "train_tokens": len(stream),
            "tokens_seen": args.steps * args.batch * args.seq_len, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
            "train_seconds": round(train_s, 1), "data_seconds": round(t_data, 1),
            "load_average_at_end": os.getloadavg()[0], "torch_threads": torch.get_num_threads()}
    (out / "training.json").write_text(json.dumps(info, indent=1) + "\n")
    return info


def split_data(tok_path: Path, out: Path, length: int, samples: int) -> dict[str, int]:
    """calibration.jsonl and held_out.jsonl: rows of `length` ids from their splits' files."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    splits = split_files()
    rows = {}
    for name in ("calibration", "held_out"):
        rows[name] = write_windows(out / f"{name}.jsonl", encode_files(tok, splits[name]), length, samples)
    return rows


def trained_model(args: argparse.Namespace, cache: Path) -> tuple[Path, dict]:
    """The cached model for these options, trained first when absent (published by one rename)."""
    opts = model_options(args)
    final = cache / f"fidelity-{cache_key(opts)}"
    if (final / "training.json").is_file():
        return final, json.loads((final / "training.json").read_text())
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{final.name}.{os.getpid()}"
    info = build_and_train(args, tmp)
    os.replace(tmp, final)
    return final, info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "reapsurgery-bench")
    add_model_options(ap)
    args = ap.parse_args()
    path, info = trained_model(args, args.cache)
    print(path)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
