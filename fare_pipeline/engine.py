"""Log-likelihood scoring engine for the probes (AALS Eq. 5, lambda grid Eq. 7) and evaluations.

A request is ``(ids, n_ctx)``: score tokens ``ids[n_ctx:]`` given ``ids[:n_ctx]`` (lm-eval's
formulation, see :func:`encode_request`). :class:`Engine` scores many requests under several
routing configurations ``(name, make_edit, start)`` - ``make_edit()`` returns a context manager
(or None = unmodified model) that edits decoder layers ``>= start`` only.

Two exact implementations, counted in the same unit (token-layer evaluations: positions of the
forward batch, padding included, times decoder layers run):

* ``naive``: one padded row per request, a full forward per configuration.
* ``cached``: (1) requests are packed into prefix trees (when the attention honours a custom 4-D
  mask, see :func:`tree_attention_ok`; otherwise one padded row per request) - a row holds several requests, a token
  prefix shared by requests (the two CrowS sentences of a pair, TruthfulQA choices after the
  same question, prompts of one template) is computed once; tree attention (a token attends to
  its ancestors only, position id = depth) makes every request's hidden states those of its own
  causal forward; (2) one unmodified pass per batch keeps the input of every decoder layer
  (:class:`fare_pipeline.probe.PrefixCache`), a configuration re-runs only layers ``start``..;
  (3) configurations without an edit, or with an identity edit (ARR at lambda = 0), reuse the base
  pass; configurations with equal keys (:func:`make_arr`, :func:`make_mask`) are scored once, in
  one call or across calls; the kept batches serve later :meth:`Engine.score` calls (AALS then the
  lambda grid: one base pass in all).

:class:`fare_pipeline.work.LayerWork` counts the same unit with hooks on the decoder layers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

MODES = ("cached", "naive")


# --------------------------------------------------------------------------- encoding (lm-eval's)


def prefix_token_id(tokenizer) -> int:
    """lm-eval HFLM.prefix_token_id: BOS, else EOS."""
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token to use as the empty-context prefix")
    return int(tid)


def encode_request(tokenizer, context: str, continuation: str) -> tuple[list[int], int]:
    """``(ids, n_ctx)`` exactly as lm-eval's HFLM.loglikelihood encodes a (context, continuation):
    empty context -> [prefix token] + continuation; else trailing spaces of the context move to the
    continuation and the continuation is the tail of the whole string's encoding."""
    enc = lambda s: list(tokenizer(s, add_special_tokens=False)["input_ids"])
    if context == "":
        cont = enc(continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        pre = prefix_token_id(tokenizer)
        return ([pre] + cont, 1) if cont[0] != pre else (cont, 1)
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = enc(context)
    whole = enc(context + continuation)
    if len(whole) <= len(ctx):
        raise ValueError(f"continuation {continuation!r} adds no tokens to its context")
    return whole, len(ctx)


# --------------------------------------------------------------------------- packing


@dataclass
class _Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor  # [B, T] (2-D, naive) or [B, 1, T, T] additive float (packed)
    position_ids: torch.Tensor | None
    req: np.ndarray  # request index of each scored token
    row: np.ndarray  # batch row of each scored token
    node: np.ndarray  # position whose logits predict it
    target: np.ndarray  # the token id

    @property
    def positions(self) -> int:
        return int(self.input_ids.shape[0] * self.input_ids.shape[1])


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def pack_rows(seqs: Sequence[Sequence[int]], max_row_tokens: int) -> list[list[tuple[int, list[int], list[int]]]]:
    """Prefix-tree rows: lists of (request, node index of each token, its tokens).

    Requests are visited in lexicographic token order, so the longest prefix a request shares with
    any earlier request of its row is the one it shares with the previous request.
    """
    order = sorted(range(len(seqs)), key=lambda i: (list(seqs[i]), i))
    rows, cur, n_nodes, prev = [], [], 0, None
    for i in order:
        s = list(seqs[i])
        k = _lcp(prev[1], s) if prev is not None else 0
        added = len(s) - k
        # a request that mostly shares its prefix (TruthfulQA choices) may grow a row up to 4x the limit
        full = n_nodes + added > max_row_tokens and (added > k or n_nodes + added > 4 * max_row_tokens)
        if cur and full:
            rows.append(cur)
            cur, n_nodes, prev, k = [], 0, None, 0
        nodes = (prev[0][:k] if k else []) + list(range(n_nodes, n_nodes + len(s) - k))
        n_nodes += len(s) - k
        cur.append((i, nodes, s))
        prev = (nodes, s)
    if cur:
        rows.append(cur)
    return rows


def _row_arrays(row):
    n = max(max(nodes) for _, nodes, _ in row) + 1
    ids = np.zeros(n, np.int64)
    depth = np.zeros(n, np.int64)
    allow = np.zeros((n, n), bool)
    for _, nodes, s in row:
        nd = np.asarray(nodes)
        ids[nd] = s
        depth[nd] = np.arange(len(nd))
        allow[nd[:, None], nd[None, :]] |= np.tril(np.ones((len(nd), len(nd)), bool))
    return ids, depth, allow


def build_batches(requests, *, mode: str, pad_id: int, batch_tokens: int = 8192, max_row_tokens: int = 256,
                  batch_size: int = 16, device="cpu", dtype=torch.float32) -> list[_Batch]:
    """Deterministic batches of ``requests`` [(ids, n_ctx)] for the given mode (``dtype``: the
    model's, for the additive tree-attention mask)."""
    if mode not in MODES + ("padded",):
        raise ValueError(f"mode={mode!r}; allowed: {', '.join(MODES)}")
    full = [list(r[0]) for r in requests]
    seqs = [s[:-1] for s in full]  # the last token is only a target (as lm-eval: inp = (ctx + cont)[:-1])
    batches = []
    if mode in ("naive", "padded"):  # one padded row per request
        order = sorted(range(len(seqs)), key=lambda i: (len(seqs[i]), i))
        for b0 in range(0, len(order), batch_size):
            idx = order[b0 : b0 + batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
            am = torch.zeros((len(idx), T), dtype=torch.long)
            req, row, node, tgt = [], [], [], []
            for b, i in enumerate(idx):
                s, c = seqs[i], requests[i][1]
                ids[b, : len(s)] = torch.tensor(s)
                am[b, : len(s)] = 1
                for t in range(c, len(full[i])):
                    req.append(i), row.append(b), node.append(t - 1), tgt.append(full[i][t])
            batches.append(_Batch(ids.to(device), am.to(device), None, *map(np.asarray, (req, row, node, tgt))))
        return batches
    rows = pack_rows(seqs, max_row_tokens)
    arrays = [_row_arrays(r) for r in rows]
    order = sorted(range(len(rows)), key=lambda j: (len(arrays[j][0]), j))
    groups, cur = [], []
    for j in order:
        T = len(arrays[j][0])
        if cur and (len(cur) + 1) * T > batch_tokens:
            groups.append(cur)
            cur = []
        cur.append(j)
    if cur:
        groups.append(cur)
    neg = torch.finfo(dtype).min
    for g in groups:
        T = max(len(arrays[j][0]) for j in g)
        ids = torch.full((len(g), T), pad_id, dtype=torch.long)
        pos = torch.zeros((len(g), T), dtype=torch.long)
        allow = torch.eye(T, dtype=torch.bool).repeat(len(g), 1, 1)  # padding attends to itself
        req, row, node, tgt = [], [], [], []
        for b, j in enumerate(g):
            a_ids, a_depth, a_allow = arrays[j]
            n = len(a_ids)
            ids[b, :n] = torch.from_numpy(a_ids)
            pos[b, :n] = torch.from_numpy(a_depth)
            allow[b, :n, :n] = torch.from_numpy(a_allow)
            for i, nodes, _ in rows[j]:
                for t in range(requests[i][1], len(full[i])):
                    req.append(i), row.append(b), node.append(nodes[t - 1]), tgt.append(full[i][t])
        mask = torch.zeros((len(g), 1, T, T), dtype=dtype).masked_fill(~allow[:, None], neg)
        batches.append(_Batch(ids.to(device), mask.to(device), pos.to(device), *map(np.asarray, (req, row, node, tgt))))
    return batches


def _token_logprobs(logits: torch.Tensor, batch: _Batch) -> torch.Tensor:
    dev = logits.device
    rows = torch.as_tensor(batch.row, device=dev)
    nodes = torch.as_tensor(batch.node, device=dev)
    sel = logits[rows, nodes].float()  # [M, V]
    tgt = torch.as_tensor(batch.target, device=dev)
    return sel.gather(-1, tgt[:, None]).squeeze(-1) - torch.logsumexp(sel, dim=-1)


# --------------------------------------------------------------------------- engine


def tree_attention_ok(model, max_len: int) -> bool:
    """Prefix trees need a custom 4-D mask honoured as given: eager/SDPA attention and no sliding
    window shorter than the longest request (the mask is used as-is, without the window)."""
    cfg = getattr(model, "config", None)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "_attn_implementation", "eager") not in ("eager", "sdpa"):
        return False
    window = getattr(text, "sliding_window", None)
    uses = getattr(text, "use_sliding_window", True) or any("sliding" in str(t) for t in (getattr(text, "layer_types", None) or []))
    return not (window and uses and int(window) < max_len)


Config = tuple  # (name, make_edit: Callable[[], ctx manager] | None, start: int | None)


class Engine:
    """Scores a fixed request list under routing configurations; counts the work it does.

    ``keep`` (cached mode): keep the base pass of every batch for later :meth:`score` calls
    (memory: the decoder-layer inputs of all requests); otherwise each call re-runs it.
    """

    def __init__(self, model, tokenizer, requests, *, mode: str = "cached", batch_tokens: int = 8192,
                 max_row_tokens: int = 256, batch_size: int = 16, keep: bool = True, progress: bool = False):
        from .probe import decoder_parts

        if not requests:
            raise ValueError("no requests to score")
        self.model, self.mode, self.keep, self.progress = model, mode, keep, progress
        self.n_requests = len(requests)
        self.n_scored = np.asarray([len(r[0]) - r[1] for r in requests], np.int64)
        if np.any(self.n_scored < 1) or any(r[1] < 1 for r in requests):
            raise ValueError("every request needs >= 1 context token and >= 1 scored token")
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix_token_id(tokenizer)
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.packed = mode == "cached" and tree_attention_ok(model, max(len(r[0]) for r in requests))
        self.batches = build_batches(requests, mode=mode if self.packed or mode == "naive" else "padded", pad_id=pad,
                                     batch_tokens=batch_tokens,
                                     max_row_tokens=max_row_tokens, batch_size=batch_size, device=param.device,
                                     dtype=dtype)
        self.n_layers = len(decoder_parts(model)[0])
        self.layer_calls = 0  # decoder-layer forward calls (one per batch and layer)
        self.token_layer_evals = 0  # positions x decoder layers actually computed
        self._caches: dict[int, object] = {}
        self._memo: dict = {}

    def _account(self, batch: _Batch, layers: int) -> None:
        self.layer_calls += layers
        self.token_layer_evals += batch.positions * layers

    def _iter(self, desc):
        if not self.progress:
            from .work import Heartbeat

            return enumerate(Heartbeat.track(self.batches, desc))  # progress lines without a terminal
        from tqdm.auto import tqdm

        return enumerate(tqdm(self.batches, desc=desc, unit="batch", leave=False))

    @torch.inference_mode()
    def score(self, configs: Sequence[Config], desc: str = "scoring") -> dict[str, np.ndarray]:
        """Summed continuation log-likelihood of every request under every configuration."""
        from .probe import PrefixCache

        names = [c[0] for c in configs]
        if len(set(names)) != len(names):
            raise ValueError(f"configuration names must be distinct; got {names}")
        out = {name: np.zeros(self.n_requests, np.float64) for name in names}
        # cached mode, exact reuse of equal configurations (same ``make_edit.key``): one scored by an
        # earlier call (``memo``: the AALS probe at lambda_probe on layer l and the grid point
        # lambda_probe when only l is selected) or earlier in this call (``alias``: the power alpha=1
        # and top-k >= all controls and the FSP baseline are the same profile); an edit marked
        # ``identity`` (ARR at lambda = 0, bit-identical by Eq. 6) is the base pass
        memo, alias, first = {}, {}, {}
        if self.mode == "cached":
            for name, make_edit, _ in configs:
                key = getattr(make_edit, "key", None)
                if key is None or getattr(make_edit, "identity", False):
                    continue
                if key in self._memo:
                    memo[name] = self._memo[key]
                elif key in first:
                    alias[name] = first[key]
                else:
                    first[key] = name
        for bi, batch in self._iter(desc):
            cache = None
            if self.mode == "cached":
                cache = self._caches.get(bi)
                if cache is None:
                    cache = PrefixCache(self.model)
                    logits = cache.run(batch.input_ids, batch.attention_mask, position_ids=batch.position_ids)
                    self._account(batch, self.n_layers)
                    lp = _token_logprobs(logits, batch).double().cpu().numpy()
                    cache.base_ll = np.bincount(batch.req, weights=lp, minlength=self.n_requests)
                    cache.logits = None
                    if self.keep:
                        self._caches[bi] = cache
            for name, make_edit, start in configs:
                if cache is not None and (make_edit is None or getattr(make_edit, "identity", False)):
                    out[name] += cache.base_ll
                    continue
                if name in memo or name in alias:
                    continue
                edit = make_edit() if make_edit is not None else None
                with edit if edit is not None else _null():
                    if cache is not None:
                        logits = cache.run_from(int(start))
                        self._account(batch, self.n_layers - int(start))
                    else:
                        logits = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                            position_ids=batch.position_ids, use_cache=False).logits
                        self._account(batch, self.n_layers)
                lp = _token_logprobs(logits, batch).double().cpu().numpy()
                out[name] += np.bincount(batch.req, weights=lp, minlength=self.n_requests)
        for name, make_edit, _ in configs:
            if name in memo:
                out[name] = memo[name].copy()
            elif name in alias:
                out[name] = out[alias[name]].copy()
            elif self.mode == "cached" and self.keep and getattr(make_edit, "key", None) is not None:
                self._memo[make_edit.key] = out[name].copy()
        return out

    def counts(self) -> dict:
        return {"mode": self.mode, "packed": self.packed, "layer_calls": self.layer_calls, "token_layer_evals": self.token_layer_evals,
                "batches": len(self.batches), "decoder_layers": self.n_layers,
                "positions_per_pass": sum(b.positions for b in self.batches)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- metrics from log-likelihoods


def pair_prefers(ll: np.ndarray, pair_rows: np.ndarray) -> np.ndarray:
    """1.0 where the stereotypical sentence (row 0 of each pair) is more likely (lm-eval crows)."""
    return (ll[pair_rows[:, 0]] > ll[pair_rows[:, 1]]).astype(np.float64)


def perplexity(ll: np.ndarray, rows: np.ndarray, n_scored: np.ndarray) -> float:
    """exp(-sum LL / scored tokens) over the given requests (token-level perplexity)."""
    return float(np.exp(-ll[rows].sum() / n_scored[rows].sum()))


def mc_correct(ll: np.ndarray, choice_rows: Sequence[np.ndarray], labels: Sequence[int]) -> np.ndarray:
    """1.0 where the highest-likelihood choice is the labelled one (TruthfulQA MC1 ``acc``)."""
    return np.asarray([float(int(np.argmax(ll[r])) == int(lab)) for r, lab in zip(choice_rows, labels)])


def make_arr(model, phi, lam: float, layers: Sequence[int], profile_layers=None, target: str = "logits") -> Callable:
    """``make_edit`` for ARR (Eq. 6) at ``lam`` on ``layers`` (``target``: see fare_models.surgery.ARR)."""
    from fare_models.surgery import ARR

    layers = [int(x) for x in layers]

    def make():
        return ARR(model, phi, float(lam), layers=layers, profile_layers=profile_layers, target=target)

    import hashlib

    blob = torch.as_tensor(phi).detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    make.key = ("arr", target, float(lam), tuple(sorted(layers)), hashlib.sha256(blob).hexdigest(),
                None if profile_layers is None else tuple(int(x) for x in profile_layers))
    make.identity = float(lam) == 0.0  # softmax(z - 0*phi) is z's own routing, bit for bit (SPEC section 5)
    return make


def make_mask(model, pairs) -> Callable:
    """``make_edit`` masking the (layer, expert) ``pairs`` (fare_models.surgery.ExpertMask)."""
    from fare_models.surgery import ExpertMask

    pairs = [tuple(p) for p in pairs]

    def make():
        return ExpertMask(model, pairs)  # validates the pairs

    try:
        make.key = ("mask", tuple(sorted({(int(layer), int(e)) for layer, e in pairs})))
    except (TypeError, ValueError):
        make.key = None  # malformed: ExpertMask raises the error when the configuration runs
    return make
