"""``fare_moe``: lm-eval's HF model plus one routing intervention or compression on an MoE model.

model_args (everything not listed is passed to lm-eval's ``hf`` model / ``from_pretrained``):

=================  ============================================================================
pretrained         hub id, local path, ``fare-tiny`` or ``fare-tiny:<model_type>`` (built offline)
intervention       none | arr | mask
profile            phi file (safetensors + JSON metadata) for ARR, checked against the model
lam                ARR strength lambda >= 0 (Eq. 6)
layers             decoder-layer indices to steer (``3|5|7``, ``2-5``; default: all profile rows)
mask               layer:expert pairs never selected (``3:5|3:7``)
arr_target         logits (default, Eq. 6) | selection (bias-after-score routers)
profile_check      model (default: the profile must name this model) | shape (only shapes)
record_routing     directory: routing aggregates written after every request batch of lm-eval
record_trace       directory: opt-in per-token routing trace shards
compression        a fare_compression method applied before evaluation; its parameters as
                   ``compression_<name>=<value>``
=================  ============================================================================
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM

from fare_core.files import check_writable_dir
from fare_core.tiny import check_pretrained, is_tiny_spec, resolve_pretrained

from .args import FareArgs, init_arg_names, split_model_args
from .profile import check_profile, load_profile
from .surgery import ARR, ExpertMask, Recorder, RoutingController

log = logging.getLogger(__name__)


@register_model("fare_moe")
class FareMoeLM(HFLM):
    """lm-eval HF model with fare-moe routing surgery; with intervention=none it *is* ``hf``."""

    def __init__(self, pretrained="fare-tiny", **kwargs) -> None:
        fare, rest = split_model_args(dict(kwargs), init_arg_names(HFLM))
        self.fare_args: FareArgs = fare
        for name in ("record_routing", "record_trace"):  # before the (slow) model load
            if getattr(fare, name):
                check_writable_dir(getattr(fare, name), name)
        if is_tiny_spec(pretrained):
            pretrained, self.model_id = resolve_pretrained(pretrained)
            rest.setdefault("tokenizer", pretrained)
        else:
            check_pretrained(pretrained)
            self.model_id = pretrained if isinstance(pretrained, str) else getattr(
                getattr(pretrained, "config", None), "name_or_path", None)
        if rest.get("device") is None:
            rest["device"] = "cuda" if torch.cuda.is_available() else "cpu"
        if fare.compression and rest.get("dtype") is None:  # as `fare compress --dtype auto`
            rest["dtype"] = "float32" if str(rest["device"]).startswith("cpu") else "bfloat16"
        super().__init__(pretrained=pretrained, **rest)
        self.routing = RoutingController.of(self.model)  # NotMoEError / UnsupportedMoEError here
        if isinstance(pretrained, str) and (Path(pretrained) / "fare_compression.json").is_file():
            from fare_compression import reapply_from_manifest  # bitsandbytes dirs are re-quantised

            self._model = reapply_from_manifest(self.model, pretrained)
            self.routing = RoutingController.of(self.model)
        if fare.compression:
            from fare_compression import apply_compression

            self._model = apply_compression(self.model, fare.compression, fare.compression_params, self.tokenizer)
            self.routing = RoutingController.of(self.model)
        self.edits = []
        self.recorder: Recorder | None = None
        self._known_inputs: set | None = None
        self._probing = False
        self._apply_intervention(fare)
        if fare.record_routing or fare.record_trace:
            self.recorder = Recorder(self.model, trace_dir=fare.record_trace, model_id=self.model_id).attach()
            self.edits.append(self.recorder)

    # ------------------------------------------------------------------ interventions
    def _apply_intervention(self, fare: FareArgs) -> None:
        if fare.intervention == "arr":
            profile = load_profile(fare.profile)
            check_profile(profile, self.routing, self.model_id, strict_model=fare.profile_check == "model")
            edit = ARR(self.model, profile.rows(), fare.lam, layers=fare.layers, target=fare.arr_target)
            self.edits.append(edit.attach())
            log.info("fare_moe: ARR lam=%s on layers %s (%s)", fare.lam, edit.layers, fare.arr_target)
        elif fare.intervention == "mask":
            self.edits.append(ExpertMask(self.model, fare.mask).attach())
            log.info("fare_moe: masking %d (layer, expert) pairs", len(fare.mask))

    def remove_interventions(self) -> None:
        """Detach every hook (the model is then exactly the loaded one)."""
        for edit in reversed(self.edits):
            edit.detach()
        self.edits = []

    # ------------------------------------------------------------------ routing records
    def _flush_routing(self, complete: bool = True) -> None:
        if self.recorder is None:
            return
        if self.fare_args.record_routing:
            self.recorder.save(self.fare_args.record_routing, complete=complete)
        if self.fare_args.record_trace:
            self.recorder._flush_trace()

    @contextlib.contextmanager
    def _recording_call(self):
        """routing.json says ``complete: false`` while requests run, ``true`` once they all returned."""
        if self.recorder is None:
            yield
            return
        self._flush_routing(complete=False)
        done = False
        try:
            yield
            done = True
        finally:
            self._flush_routing(complete=done)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        if self.recorder is None:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        n = self.max_length + 1
        self._known_inputs = {tuple((ctx + cont)[-n:][:-1]) for _, ctx, cont in requests}
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._known_inputs = None

    def _detect_batch_size(self, requests=None, pos: int = 0):
        self._probing = True
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self._probing = False

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.recorder is not None and attn_mask is None:
            self.recorder.set_token_mask(self._real_token_mask(inps))
        return super()._model_call(inps, attn_mask=attn_mask, labels=labels)

    def _real_token_mask(self, inps: torch.Tensor) -> torch.Tensor:
        """[B, T] mask of real tokens in lm-eval's right-padded (with id 0, no attention mask) batch."""
        B, T = inps.shape
        mask = torch.zeros(B, T, dtype=torch.bool)
        if self._probing:
            return mask
        rows = inps.tolist()
        for b, row in enumerate(rows):
            zeros = 0
            while zeros < T and row[T - 1 - zeros] == 0:
                zeros += 1
            length = T - zeros
            if zeros and self._known_inputs is not None:
                # a real sequence may itself end in token 0: take the shortest known prefix
                for cand in range(T - zeros, T + 1):
                    if tuple(row[:cand]) in self._known_inputs:
                        length = cand
                        break
            mask[b, :length] = True
        return mask

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        with self._recording_call():
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        with self._recording_call():
            return super().loglikelihood_rolling(requests, disable_tqdm=disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        with self._recording_call():
            return super().generate_until(requests, disable_tqdm=disable_tqdm)

    def get_model_info(self) -> dict:
        info = super().get_model_info()
        fa = self.fare_args
        info["fare_moe"] = {
            "model_id": self.model_id, "intervention": fa.intervention, "lam": fa.lam, "layers": fa.layers,
            "profile": fa.profile, "arr_target": fa.arr_target, "mask": fa.mask, "compression": fa.compression,
            "moe_layers": [layer.index for layer in self.routing.layers],
        }
        return info
