"""Prefix-cached probes for AALS and the lambda grid (issue 4, "Performance").

A routing edit confined to decoder layers >= l (ARR on MoE layer l, Eq. 6) cannot change the
input of layer l. :class:`PrefixCache` runs a batch once through the unmodified model, keeps the
input of every decoder layer (plus the shared per-layer kwargs: position embeddings, masks) and
re-runs only layers l..N-1, the final norm and the LM head for each probe. It counts decoder-layer
evaluations so a benchmark can print cached vs naive side by side.

Scoring helpers turn logits into per-sequence log-likelihoods (CrowS-Pairs preference: share of
pairs whose first sentence is more likely) and token NLL sums (perplexity).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def decoder_parts(model: nn.Module) -> tuple[nn.ModuleList, nn.Module, nn.Module]:
    """(decoder layers, final norm, LM head) of a transformers causal LM."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", None)
    layers = getattr(decoder, "layers", None)
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or norm is None or head is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers / final norm / LM head for prefix caching")
    return layers, norm, head


class PrefixCache:
    """Inputs of every decoder layer for one batch, captured from an unmodified forward."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.layers, self.norm, self.head = decoder_parts(model)
        self.inputs: list[torch.Tensor | None] = []
        self.kwargs: list[dict] = []
        self.layer_evals = 0  # decoder-layer forwards run through this object
        self.logits: torch.Tensor | None = None

    @torch.inference_mode()
    def run(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
            position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Full forward (whatever edits are active), capturing each decoder layer's input.

        ``attention_mask`` may be 2-D (padding) or a prepared 4-D additive mask (tree attention,
        with ``position_ids``)."""
        n = len(self.layers)
        self.inputs, self.kwargs = [None] * n, [{} for _ in range(n)]
        handles = []

        def capture(i):
            def hook(module, args, kwargs):
                hs = args[0] if args else kwargs["hidden_states"]
                self.inputs[i] = hs
                self.kwargs[i] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                self.kwargs[i]["_extra_args"] = args[1:]
            return hook

        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(capture(i), with_kwargs=True))
        try:
            kw = {} if position_ids is None else {"position_ids": position_ids}
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
        finally:
            for h in handles:
                h.remove()
        if any(x is None for x in self.inputs):
            raise ValueError("not every decoder layer ran during the base forward; cannot cache prefixes")
        self.layer_evals += n
        self.logits = out.logits
        return out.logits

    @torch.inference_mode()
    def run_from(self, start: int) -> torch.Tensor:
        """Logits of the cached batch re-running decoder layers ``start``.. only (edits active now apply)."""
        if not self.inputs:
            raise ValueError("run() a base batch before run_from()")
        if not 0 <= start < len(self.layers):
            raise ValueError(f"start={start}; allowed: 0..{len(self.layers) - 1}")
        h = self.inputs[start]
        for i in range(start, len(self.layers)):
            kw = dict(self.kwargs[i])
            extra = kw.pop("_extra_args", ())
            out = self.layers[i](h, *extra, **kw)
            h = out[0] if isinstance(out, tuple) else out
        self.layer_evals += len(self.layers) - start
        return self.head(self.norm(h))


# --------------------------------------------------------------------------- scoring


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, T-1] log p(token_t | tokens_<t) with 0 at padding (first token is never scored)."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    if attention_mask is not None:
        lp = lp * attention_mask[:, 1:].to(lp.dtype)
    return lp


def sequence_logprob(logits, input_ids, attention_mask=None) -> torch.Tensor:
    """[B] summed token log-probabilities (CrowS-Pairs sentence score)."""
    return token_logprobs(logits, input_ids, attention_mask).sum(-1)


def pair_preference(scores_first: torch.Tensor, scores_second: torch.Tensor) -> float:
    """Share of pairs where the first sentence (stereotypical) is more likely."""
    if scores_first.shape != scores_second.shape or scores_first.numel() == 0:
        raise ValueError("pair_preference needs two equal, non-empty score vectors")
    return float((scores_first > scores_second).double().mean())


def nll_and_count(logits, input_ids, attention_mask=None) -> tuple[float, int]:
    """(summed token NLL, scored tokens) for perplexity = exp(NLL / count)."""
    lp = token_logprobs(logits, input_ids, attention_mask)
    n = int(attention_mask[:, 1:].sum()) if attention_mask is not None else lp.numel()
    return float(-lp.sum()), n


# --------------------------------------------------------------------------- probe driver


def _encode(tokenizer, texts, device):
    enc = [tokenizer(t)["input_ids"] for t in texts]
    if any(len(e) < 2 for e in enc):
        raise ValueError("every probe text needs at least 2 tokens to be scored")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    T = max(map(len, enc))
    ids = torch.full((len(enc), T), pad, dtype=torch.long)
    am = torch.zeros((len(enc), T), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        am[i, : len(e)] = 1
    return ids.to(device), am.to(device)


def run_probes(model, tokenizer, pairs, ppl_texts, configs, *, batch_size: int = 16, cached: bool = True) -> dict:
    """Evaluate CrowS-style pair preference and perplexity for several routing configurations.

    ``pairs``: [(stereotypical, anti-stereotypical)] sentences; ``ppl_texts``: held-out texts.
    ``configs``: [(name, make_edit, start)] where ``make_edit()`` returns a context manager (or
    None for the unmodified model) that edits decoder layers >= ``start`` only. ``cached=True``
    re-runs only layers ``start``.. from one base pass per batch (a config whose ``make_edit`` is
    None reuses the base logits); ``cached=False`` is the naive full forward per configuration.
    Returns {"results": {name: {"pref", "ppl"}}, "layer_evals", "cached"}.
    """
    if not pairs or not ppl_texts:
        raise ValueError("run_probes needs at least one pair and one perplexity text")
    device = next(model.parameters()).device
    cache = PrefixCache(model)
    n_dec = len(cache.layers)
    wins = {name: 0 for name, _, _ in configs}
    nll = {name: 0.0 for name, _, _ in configs}
    count = {name: 0 for name, _, _ in configs}
    evals = 0
    flat = [s for pair in pairs for s in pair]  # pair i -> rows 2i, 2i+1
    batches = [("pairs", flat[i : i + 2 * batch_size]) for i in range(0, len(flat), 2 * batch_size)]
    batches += [("ppl", ppl_texts[i : i + batch_size]) for i in range(0, len(ppl_texts), batch_size)]
    for kind, texts in batches:
        ids, am = _encode(tokenizer, texts, device)
        base = None
        if cached:
            before = cache.layer_evals
            base = cache.run(ids, am)
            evals += cache.layer_evals - before
        for name, make_edit, start in configs:
            edit = make_edit() if make_edit is not None else None
            with torch.inference_mode():
                if edit is None and cached:
                    logits = base
                elif cached:
                    with edit:
                        before = cache.layer_evals
                        logits = cache.run_from(start)
                        evals += cache.layer_evals - before
                else:
                    ctx = edit if edit is not None else torch.inference_mode()
                    with ctx:
                        logits = model(input_ids=ids, attention_mask=am, use_cache=False).logits
                    evals += n_dec
            if kind == "pairs":
                s = sequence_logprob(logits, ids, am)
                wins[name] += int((s[0::2] > s[1::2]).sum())
            else:
                a, b = nll_and_count(logits, ids, am)
                nll[name] += a
                count[name] += b
    results = {name: {"pref": wins[name] / len(pairs), "ppl": math.exp(nll[name] / count[name])} for name in wins}
    return {"results": results, "layer_evals": evals, "cached": cached, "decoder_layers": n_dec}


def aals_probe(model, tokenizer, phi, pairs, ppl_texts, *, lam: float = 1.0, batch_size: int = 16,
               cached: bool = True, profile_layers=None, **aals_kwargs):
    """AALS (Eq. 5): ARR at ``lam`` on one MoE layer at a time; returns (AALSResult, probe output)."""
    from fare_models.surgery import ARR, RoutingController

    from .aals import aals_from_probes

    moe = [m.index for m in RoutingController.of(model).layers]
    configs = [("base", None, None)] + [
        (str(i), (lambda i=i: ARR(model, phi, lam, layers=[i], profile_layers=profile_layers)), i) for i in moe
    ]
    out = run_probes(model, tokenizer, pairs, ppl_texts, configs, batch_size=batch_size, cached=cached)
    r = out["results"]
    result = aals_from_probes(moe, r["base"]["pref"], r["base"]["ppl"], [r[str(i)]["pref"] for i in moe],
                              [r[str(i)]["ppl"] for i in moe], **aals_kwargs)
    return result, out


def tune_probe(model, tokenizer, phi, layers, pairs, ppl_texts, *, lambdas, beta: float = 1.0,
               batch_size: int = 16, cached: bool = True, profile_layers=None, **select_kwargs):
    """Eq. 7 over a lambda grid with ARR on ``layers``; returns (OperatingPoint, probe output).

    lambda = 0 is the unmodified model (ARR at 0 is bit-identical), so it reuses the base pass.
    """
    from fare_models.surgery import ARR

    from .aals import select_lambda

    layers = sorted(int(x) for x in layers)
    if not layers:
        raise ValueError("tune_probe needs at least one selected layer")
    configs = [("base", None, None)]
    for lam in lambdas:
        if float(lam) == 0.0:
            continue
        configs.append((repr(float(lam)), (lambda lam=float(lam): ARR(model, phi, lam, layers=layers,
                                                                       profile_layers=profile_layers)), layers[0]))
    out = run_probes(model, tokenizer, pairs, ppl_texts, configs, batch_size=batch_size, cached=cached)
    r = out["results"]
    key = lambda lam: "base" if float(lam) == 0.0 else repr(float(lam))  # noqa: E731
    op = select_lambda(list(lambdas), [r[key(x)]["pref"] for x in lambdas], [r[key(x)]["ppl"] for x in lambdas],
                       ppl_base=r["base"]["ppl"], beta=beta, **select_kwargs)
    return op, out
