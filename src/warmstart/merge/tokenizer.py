"""Tokenizer merging as mergekit 0.1.5 does it: ``tokenizer_source``, the ``tokenizer:`` block, ``chat_template``.

The output vocabulary comes from the base (``base``), one model (a path), or the
union of every input's (``union``: the base's tokenizer plus, in input order,
every token another model has within its ``vocab_size``). Each vocabulary
tensor (input embedding, lm_head) of each input is then re-indexed to it
*before* the merge method runs, so the method merges rows of the same token:

* a token the input has keeps that input's row;
* a token it lacks gets a default row: the only model that has it, else the
  base's row if the base has it, else the mean over the models that have it,
  else zeros — or what ``tokenizer.tokens`` says (``source: model`` /
  ``{kind: zero}`` / ``{kind: model_token, model, token_id | token}``; with
  ``force: true`` every input takes that row);
* ``pad_to_multiple_of`` rounds the row count up; the padding rows are the mean
  of the real rows (mergekit's choice, after Hewitt's vocabulary-expansion note).

The tokenizers are built with transformers' own calls in mergekit's order, so
the output tokenizer is the one mergekit writes. One difference: mergekit visits
the non-base models in ``set`` order (it varies with PYTHONHASHSEED); we visit
them in the config's order, so tokens several models add get stable ids.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ConfigError, IncompatibleError

# Files that make up a tokenizer: removed before the merged tokenizer is saved, so none is stale.
TOKENIZER_FILES = ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
                   "added_tokens.json", "merges.txt", "vocab.json", "chat_template.jinja", "chat_template.json")
# Names of vocabulary-indexed tensors (rows = tokens), as in mergekit's architecture files.
VOCAB_SUFFIXES = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "embed_in.weight", "embed_out.weight",
                  "word_embeddings.weight", "tok_embeddings.weight", "output.weight")
# Written here (not copied from mergekit's data files): the standard ChatML template.
NAMED_TEMPLATES = {
    "chatml": "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
              "'<|im_end|>' + '\\n'}}{% endfor %}\n{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
              "{% endif %}\n",
}


# ----------------------------------------------------------------------------
# Validation (MergePlan calls this for its tokenizer_source / tokenizer / chat_template fields)


def tokenizer_problems(tokenizer_source, tokenizer, chat_template) -> list[str]:
    """Every problem with the tokenizer keys, one string each (empty: fine)."""
    p = []
    if tokenizer_source is not None and tokenizer is not None:
        p.append("give tokenizer_source or a tokenizer: block, not both (as mergekit)")
    if tokenizer_source is not None and not isinstance(tokenizer_source, str):
        p.append(f"tokenizer_source must be base, union or a model path, got {tokenizer_source!r}")
    if tokenizer is not None:
        p += _block_problems(tokenizer)
    if chat_template is not None and not isinstance(chat_template, str):
        p.append(f"chat_template must be a string, got {chat_template!r}")
    elif chat_template is not None and chat_template != "auto" and chat_template not in NAMED_TEMPLATES and (
            "{" not in chat_template or len(chat_template) < 20):
        p.append(f"chat_template {chat_template!r} is neither a Jinja template, 'auto' nor a known name "
                 f"({', '.join(NAMED_TEMPLATES)}; mergekit's other named templates: pass their text)")
    return p


def _block_problems(block) -> list[str]:
    if not isinstance(block, dict):
        return [f"tokenizer: must be a mapping, got {block!r}"]
    p = []
    extra = set(block) - {"source", "tokens", "pad_to_multiple_of"}
    if extra:
        p.append(f"tokenizer: unknown key(s) {sorted(extra)} (known: source, tokens, pad_to_multiple_of)")
    if not isinstance(block.get("source", "union"), str):
        p.append(f"tokenizer.source must be base, union or a model path, got {block['source']!r}")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and not (isinstance(pad, int) and not isinstance(pad, bool) and pad > 0):
        p.append(f"tokenizer.pad_to_multiple_of must be a positive integer, got {pad!r}")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        return p + [f"tokenizer.tokens must be a mapping token → {{source, force}}, got {tokens!r}"]
    for tok, cfg in tokens.items():
        p += [f"tokenizer.tokens[{tok!r}]: {m}" for m in _token_problems(cfg)]
    return p


def _token_problems(cfg) -> list[str]:
    if not isinstance(cfg, dict) or set(cfg) - {"source", "force"}:
        return [f"expected {{source: ..., force: ...}}, got {cfg!r}"]
    src = cfg.get("source")
    if isinstance(src, dict):
        kind = src.get("kind")
        if kind == "zero":
            return [] if set(src) == {"kind"} else [f"{{kind: zero}} takes no other key, got {sorted(src)}"]
        if kind != "model_token":
            return [f"source kind must be zero or model_token, got {kind!r}"]
        if "model" not in src or ("token_id" in src) == ("token" in src):
            return ["model_token needs model and exactly one of token_id / token"]
        return []
    return [] if src is None or isinstance(src, str) else [f"source must be a model, or a mapping with kind, "
                                                           f"got {src!r}"]


# ----------------------------------------------------------------------------
# Building the output tokenizer and the per-input permutations


def model_vocab_size(cfg: dict) -> int | None:
    """The embedding rows a model really has (config vocab_size; multimodal configs keep it in text_config)."""
    v = cfg.get("vocab_size")
    if v is None and isinstance(cfg.get("text_config"), dict):
        v = cfg["text_config"].get("vocab_size")
    return int(v) if v is not None else None


def _load_tokenizer(path, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), use_fast=True)
    except Exception as e:  # transformers raises many types; the user needs the path and the reason
        raise ConfigError(f"cannot load the tokenizer of {what} ({type(e).__name__}: {str(e).splitlines()[0]})",
                          path=path) from None


def stripped_tokenizer(ck):
    """The model's tokenizer without the tokens it has no embedding row for (ids ≥ vocab_size), as mergekit."""
    import tokenizers

    tok = _load_tokenizer(ck.path, "the base model")
    vocab_size = model_vocab_size(ck.config) or len(tok.get_vocab())
    unused = {t for t, i in tok.get_vocab().items() if i >= vocab_size}
    if not unused:
        return tok
    d = json.loads(tok._tokenizer.to_str())
    if not tok.is_fast or d["model"]["type"] != "BPE":
        raise IncompatibleError(f"the tokenizer has {len(unused)} token(s) beyond vocab_size {vocab_size} and is not "
                                "a fast BPE tokenizer: they cannot be stripped (mergekit has the same limit)",
                                path=ck.path)
    d["added_tokens"] = [e for e in d["added_tokens"] if e["id"] < vocab_size]
    for t in unused:
        d["model"]["vocab"].pop(t, None)
    pair = lambda m: m.split(" ") if isinstance(m, str) else m
    d["model"]["merges"] = [m for m in d["model"]["merges"] if not any(t in unused for t in pair(m))]
    tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(d))
    return tok


def union_tokenizer(base_tok, toks: list, vocab_sizes: list[int]):
    """The base's tokenizer + every other token the inputs use (plain tokens first, then added/special ones)."""
    from transformers import AutoTokenizer

    vocab, added = {}, {}
    for tok, vsize in zip(toks, vocab_sizes):
        dec = tok.added_tokens_decoder
        names = {a.content for a in dec.values()}
        for t, i in tok.get_vocab().items():
            if i < vsize and t not in names and t not in vocab:
                vocab[t] = len(vocab)
        for i, info in dec.items():
            if i < vsize and info.content not in added:
                added[info.content] = info  # the first model's settings win, as mergekit
    with tempfile.TemporaryDirectory() as d:  # a copy: the base's tokenizer object stays as it was
        base_tok.save_pretrained(d)
        res = AutoTokenizer.from_pretrained(d, use_fast=True)
    base_vocab = base_tok.get_vocab()
    for t in vocab:
        if t not in added and t not in base_vocab:
            res.add_tokens(t)
    for info in added.values():
        res.add_tokens(info)
    return res


@dataclass
class VocabPlan:
    """The output tokenizer and, for each input (by checkpoint path), new row → old row (−1: it lacks the token)."""

    tokenizer: object
    rows: int  # output rows (padded)
    perms: dict[str, torch.Tensor]
    original_vocabs: dict[str, dict]
    order: list[str]  # mergekit's input order: models as listed, the base last
    base: str | None
    tokens: dict = field(default_factory=dict)  # token → parsed {source, force}
    chat_template: str | None = None

    def is_vocab_tensor(self, name: str, rows_by_input: dict[str, int], sizes: dict[str, int]) -> bool:
        return name.endswith(VOCAB_SUFFIXES) and all(r == sizes.get(k) for k, r in rows_by_input.items())

    def permute(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Re-index every input's rows to the output vocabulary (mergekit's PermutedVocabulary)."""
        models = [k for k in self.order if k in tensors]
        dtype = tensors[models[0]].dtype
        for t in tensors.values():
            dtype = torch.promote_types(dtype, t.dtype)
        vocab = self.tokenizer.get_vocab()
        everywhere = torch.stack([self.perms[m] >= 0 for m in models]).all(0)
        # only tokens some input lacks, or that the config names, need a default row (as mergekit's loop)
        todo = {t: i for t, i in vocab.items() if t in self.tokens or not bool(everywhere[i])}
        cfgs = dict(self.tokens)
        average = self._assign_sources(models, todo, cfgs)
        defaults = {}
        for token, tid in todo.items():
            cfg = cfgs.get(token)
            if not (cfg and cfg["force"]) and bool(everywhere[tid]):
                continue
            if token in average:
                emb, n = torch.zeros(tensors[models[0]].shape[1:], dtype=dtype), 0
                for m in models:
                    if int(self.perms[m][tid]) >= 0:
                        emb, n = emb + tensors[m][int(self.perms[m][tid])], n + 1
                defaults[token] = emb / n
            elif cfg is not None:
                defaults[token] = self._default_row(tensors, token, tid, cfg)
        forced = [vocab[t] for t, c in cfgs.items() if c.get("force") and t in vocab]
        return {m: self._rebuild(tensors[m].to(dtype), self.perms[m], vocab, forced, defaults) for m in tensors}

    def _assign_sources(self, models, vocab, cfgs) -> set[str]:
        average = set()
        for token, tid in vocab.items():
            if token in cfgs:
                continue
            have = [int(self.perms[m][tid]) >= 0 for m in models]
            if sum(have) == 1:
                cfgs[token] = {"source": ("model", models[have.index(True)]), "force": False}
            elif sum(have) == 0:
                cfgs[token] = {"source": ("zero",), "force": False}
            elif self.base in models and int(self.perms[self.base][tid]) >= 0:
                cfgs[token] = {"source": ("model", self.base), "force": False}
            else:
                average.add(token)
        return average

    def _default_row(self, tensors, token, tid, cfg) -> torch.Tensor:
        src = cfg["source"]
        first = next(iter(tensors.values()))
        if src is None:
            raise ConfigError(f"tokenizer.tokens[{token!r}] needs a source (the token is missing from some model)")
        if src[0] == "zero":
            return first.new_zeros(first.shape[1:])
        m = src[1]
        if m not in tensors:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: source {m} is not an input of this tensor")
        if src[0] == "model_token":
            idx = src[2] if src[2] is not None else self.original_vocabs[m].get(src[3])
            if idx is None or not 0 <= idx < tensors[m].shape[0]:
                raise ConfigError(f"tokenizer.tokens[{token!r}]: token {src[3] if src[2] is None else idx!r} "
                                  f"is not in {m}")
            return tensors[m][idx]
        idx = int(self.perms[m][tid])
        if idx < 0:
            raise ConfigError(f"tokenizer.tokens[{token!r}]: {m} has no such token")
        return tensors[m][idx]

    def _rebuild(self, old, perm, vocab, forced, defaults) -> torch.Tensor:
        new = torch.zeros((self.rows, *old.shape[1:]), dtype=old.dtype)
        keep = perm >= 0
        keep[forced] = False
        ids = keep.nonzero().view(-1)
        new[ids] = old[perm[ids]]  # rows the input has: copied (the same bits as mergekit's row loop)
        for token, row in defaults.items():
            if not bool(keep[vocab[token]]):
                new[vocab[token]] = row
        if self.rows > len(vocab):  # padding rows: the mean of the real ones
            new[len(vocab):] = torch.mean(new[: len(vocab)], dim=0)
        return new

    def write(self, out: Path) -> None:
        """Save the tokenizer (replacing any copied one) and set vocab_size in config.json."""
        _save_tokenizer(self.tokenizer, out, self.chat_template)
        cfg_path = out / "config.json"
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            holder = cfg if "vocab_size" in cfg or not isinstance(cfg.get("text_config"), dict) else cfg["text_config"]
            holder["vocab_size"] = self.rows
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _save_tokenizer(tok, out: Path, chat_template: str | None) -> None:
    for f in TOKENIZER_FILES:
        (out / f).unlink(missing_ok=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.save_pretrained(str(out))


def _parse_tokens(tokens: dict, resolve) -> dict:
    """YAML token entries → {token: {"source": ('model', key) | ('zero',) | ('model_token', key, id, tok) | None}}."""
    out = {}
    for tok, cfg in (tokens or {}).items():
        src = cfg.get("source")
        if isinstance(src, dict) and src.get("kind") == "zero":
            parsed = ("zero",)
        elif isinstance(src, dict):
            parsed = ("model_token", resolve(src["model"]), src.get("token_id"), src.get("token"))
        else:
            parsed = ("model", resolve(src)) if src is not None else None
        out[str(tok)] = {"source": parsed, "force": bool(cfg.get("force", False))}
    return out


def _inputs(plan, models: list, base):
    """(base, {path: checkpoint}, mergekit's input order: models as listed, an unlisted base last)."""
    if base is None and getattr(plan, "config_from", None):
        # mergekit YAML, linear with the base listed among the models: it is a model here, but still the base
        # (its tokenizer is the starting point; its rows fill tokens other models lack)
        want = str(Path(plan.config_from).expanduser().resolve())
        base = next((c for c in models if str(Path(c.path).resolve()) == want), None)
    inputs = {str(c.path): c for c in models + ([base] if base is not None else [])}
    order = list(dict.fromkeys(str(c.path) for c in models))
    if base is not None and str(base.path) not in order:
        order.append(str(base.path))
    return base, inputs, order


def _permutation(vocab: dict, model_vocab: dict, size: int) -> torch.Tensor:
    """new id → the model's id for the same token (−1 where it lacks it or has no embedding row for it)."""
    perm = torch.full((len(vocab),), -1, dtype=torch.long)
    for t, i in vocab.items():
        j = model_vocab.get(t)
        if j is not None and j < size:
            perm[i] = j
    return perm


def build_vocab_plan(plan, models: list, base=None) -> VocabPlan | None:
    """The output vocabulary for ``plan`` (None when the plan keeps the reference's tokenizer as it is).

    ``models`` are the opened input checkpoints in config order, ``base`` the base checkpoint (or None).
    """
    src, block = getattr(plan, "tokenizer_source", None), getattr(plan, "tokenizer", None)
    if block is None and src is None:
        return None
    source = block.get("source", "union") if block is not None else src
    base, inputs, order = _inputs(plan, models, base)

    def resolve(ref) -> str:
        p = str(Path(str(ref)).expanduser().resolve())
        hit = [k for k in inputs if str(Path(k).resolve()) == p or inputs[k].ref == str(ref)]
        if not hit:
            raise ConfigError(f"tokenizer: {ref!r} is not one of the merge's inputs", path=plan.source)
        return hit[0]

    tokens = _parse_tokens(block.get("tokens") if block else None, resolve)
    pad = block.get("pad_to_multiple_of") if block else None
    base_key = str(base.path) if base is not None else order[0]
    toks = {base_key: stripped_tokenizer(inputs[base_key])}
    toks.update({k: _load_tokenizer(inputs[k].path, inputs[k].ref) for k in order if k != base_key})
    sizes = {k: model_vocab_size(inputs[k].config) or len(toks[k].get_vocab()) for k in order}
    out = _output_tokenizer(source, base_key, toks, sizes)
    have = set(out.get_vocab())
    for t in tokens:
        if t not in have:
            out.add_tokens(t)
            have.add(t)
    vocab = out.get_vocab()
    rows = len(vocab) if not pad or len(vocab) % pad == 0 else (len(vocab) // pad + 1) * pad
    perms = {k: _permutation(vocab, toks[k].get_vocab(), sizes[k]) for k in order}
    return VocabPlan(out, rows, perms, {k: t.get_vocab() for k, t in toks.items()}, order,
                     str(base.path) if base is not None else None, tokens,
                     resolve_chat_template(getattr(plan, "chat_template", None), models, base))


def _output_tokenizer(source: str, base_key: str, toks: dict, sizes: dict):
    if source == "base":
        return toks[base_key]
    if source == "union":
        seq = [base_key] + [k for k in toks if k != base_key]  # the base first, then the inputs in order
        return union_tokenizer(toks[base_key], [toks[k] for k in seq], [sizes[k] for k in seq])
    return _load_tokenizer(Path(str(source)), f"tokenizer source {source}")


def resolve_chat_template(name: str | None, models: list, base=None) -> str | None:
    """``auto`` (the template most inputs share), a known name, or the literal Jinja text."""
    if name is None or name in NAMED_TEMPLATES:
        return NAMED_TEMPLATES.get(name) if name else None
    if name != "auto":
        return name
    from collections import Counter

    found = []
    for ck in list({str(c.path): c for c in ([base] if base is not None else []) + list(models)}.values()):
        try:
            t = _load_tokenizer(ck.path, ck.ref).chat_template
        except ConfigError:
            continue
        t = t.get("default") if isinstance(t, dict) else t
        if t:
            found.append(t.strip())
    return Counter(found).most_common(1)[0][0] if found else None


def write_chat_template(out: Path, name: str | None, models: list, base=None) -> None:
    """Only a chat template asked for (no tokenizer merge): re-save the copied tokenizer with it."""
    text = resolve_chat_template(name, models, base)
    if text is None:
        return
    tok = _load_tokenizer(out, "the merged model")
    _save_tokenizer(tok, out, text)


__all__ = ["VocabPlan", "build_vocab_plan", "resolve_chat_template", "tokenizer_problems", "write_chat_template"]
