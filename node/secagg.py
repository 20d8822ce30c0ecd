"""Secure aggregation at the site: the ClientApp's train mod that masks the adapter update before it leaves.

Under `fedseek run --secagg` the coordinator drives Flower's SecAgg+ protocol (coordinator/secagg.py):
four `train` messages per round carrying a `secaggplus` ConfigRecord (setup, share keys, collect masked
vectors, unmask). Flower's `secaggplus_mod` answers the key-exchange stages itself; at the masking stage
it calls the ClientApp's own `train` (the agent trains the round as always, charging its ledger) and this
module turns that reply into what the mod masks:

- the summed factors (every LoRA tensor, or under FFA-LoRA the B factors only), as float64 arrays in
  sorted-name order: float64 because SecAgg+ quantises `x * weight` at 2**30 levels and float32 would
  round those products to 2**24 levels first;
- the tensor names and shapes, the privacy report, the adapter descriptor and the signed witness
  statements stay as they are, in clear: they are metadata the coordinator checks per site;
- under FFA-LoRA's first round the shared seeded A (not trained, identical at every site, named by its
  digest) travels in clear too, so the coordinator can complete the adapter.

The plaintext `arrays` record is removed from the reply; the mod clears every ArrayRecord after masking.
A value the quantiser would clip is refused here (an error reply, which the protocol treats as a
dropout) rather than silently summed wrong. Messages without a `secaggplus` record pass through.
"""

from __future__ import annotations

import importlib
import json
from typing import Any, cast

import numpy as np
from flwr.app import ConfigRecord, Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Key, Stage
from flwr.compat.common import recorddict_compat as compat

from federation.protocol import records, wire
from federation.protocol.secagg_masks import CHECK_VALUE, harden, unsafe_setup

# By name: the package re-exports a function under the module's own name.
flower_secaggplus = importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod")
harden(flower_secaggplus)  # masks from the whole 256-bit seed, as the coordinator's workflow draws them

SECAGG = "secagg"
"""The reply's clear metadata of the masked vector: `names`, `shapes` (JSON) and `lora-a` (FFA-LoRA's A, or b"")."""


class SecAggRefused(wire.WireError):
    """This site's update cannot be masked faithfully (a value outside the clipping range, too many examples)."""


def summed_factors(arrays: wire.Arrays, *, ffa: bool) -> wire.Arrays:
    """The tensors that go into the secure sum: all of them, or under FFA-LoRA the B factors."""
    return wire.lora_b(arrays) if ffa else dict(arrays)


def layout_of(arrays: wire.Arrays) -> tuple[list[str], str]:
    """Sorted tensor names and their shapes as JSON: the order of the masked vector."""
    names = sorted(arrays)
    return names, json.dumps([list(arrays[n].shape) for n in names])


def check_range(arrays: wire.Arrays, *, weight_ratio: float, clipping_range: float) -> None:
    """SecAgg+ clips `x * weight_ratio` to +-clipping_range before quantising: refuse instead of clipping."""
    if weight_ratio > 1.0:
        raise SecAggRefused(
            f"secure aggregation: {weight_ratio:.3f} times the largest weight the coordinator announced "
            "(the dataset grew since the readiness answer); update withheld"
        )
    peak = max((float(np.max(np.abs(v))) for v in arrays.values() if v.size), default=0.0)
    if peak * weight_ratio > clipping_range:
        raise SecAggRefused(  # no magnitude in the message: it would tell the coordinator about this update
            f"secure aggregation: a LoRA value exceeds the clipping range {clipping_range:g}; "
            "update withheld rather than clipped"
        )


def _mod_state(context: Context) -> dict[str, Any]:
    return dict(context.state.config_records.get(RECORD_KEY_STATE, {}))


def masking_input(reply: Message, context: Context, *, ffa: bool) -> Message:
    """The ClientApp's train reply rewritten for `secaggplus_mod`: the summed factors as FitRes parameters,
    the plaintext arrays removed, names/shapes (and FFA-LoRA's shared A) in clear under `secagg`."""
    content = reply.content
    update = records.update_from_content(content)
    report = records.config_to_report(content.config_records[records.PRIVACY])
    summed = summed_factors(update.arrays, ffa=ffa)
    state = _mod_state(context)
    max_weight = float(cast(float, state.get("max_weight", 1.0)))
    check_range(
        summed,
        weight_ratio=report.num_examples / max_weight,
        clipping_range=float(cast(float, state.get("clipping_range", 0.0))),
    )
    names, shapes = layout_of(summed)
    clear_a = wire.lora_a(update.arrays) if ffa and update.factors == "AB" else {}
    del content.array_records[records.ARRAYS]
    content.config_records[SECAGG] = ConfigRecord(
        {"names": names, "shapes": shapes, "lora-a": wire.encode(clear_a) if clear_a else b""}
    )
    fitres = FitRes(
        status=Status(Code.OK, ""),
        # the summed tensors in name order, then the check value the coordinator expects back
        parameters=ndarrays_to_parameters(
            [*(summed[n].astype(np.float64) for n in names), np.array([CHECK_VALUE], dtype=np.float64)]
        ),
        num_examples=report.num_examples,
        metrics={},
    )
    for key, record in compat.fitres_to_recorddict(fitres, keep_input=True).items():
        content[key] = record
    return reply


def secagg_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's `secaggplus_mod` for SecAgg+ rounds; any other message goes straight to the handler."""
    if msg.metadata.message_type != MessageType.TRAIN or RECORD_KEY_CONFIGS not in msg.content.config_records:
        return call_next(msg, context)
    setup = msg.content.config_records[RECORD_KEY_CONFIGS]
    if setup.get(Key.STAGE) == Stage.SETUP:  # the coordinator picks the parameters: a site joins only safe ones
        why = unsafe_setup(
            sites=int(cast(int, setup.get(Key.SAMPLE_NUMBER, 0))),
            shares=int(cast(int, setup.get(Key.SHARE_NUMBER, 0))),
            threshold=int(cast(int, setup.get(Key.THRESHOLD, 0))),
        )
        if why:
            raise SecAggRefused(f"{why}; this site does not join the round")

    def train_then_prepare(inner: Message, ctxt: Context) -> Message:
        reply = call_next(inner, ctxt)
        if reply.has_error():
            raise RuntimeError(f"training for the secure round failed: {reply.error.reason}")
        config = inner.content.config_records.get(records.CONFIG)
        return masking_input(reply, ctxt, ffa=bool(config.get("ffa-lora", False)) if config else False)

    return secaggplus_mod(msg, context, train_then_prepare)
