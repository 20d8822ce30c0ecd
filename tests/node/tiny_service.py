"""A NodeService on the tiny model and the site's data, assembled as the agent assembles one (no PKI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from federation.protocol.config import NodeConfig
from node.build import assemble_node
from node.data import load_jsonl, tokenize
from node.engine import ModelHost
from node.model import load_model
from node.service import NodeService


def tiny_service(
    model_dir: Path, data_dir: Path, state: Path, *, n_train: int, n_eval: int, **config: Any
) -> NodeService:
    """The first `n_train` training and `n_eval` evaluation records; state under `state`; `config`: more
    NodeConfig fields (e.g. the vLLM serving backend's)."""
    model, tok = load_model(model_dir)
    host = ModelHost(model, tok, model_name=model_dir.name)
    config = NodeConfig(
        name="site-a",
        model_dir=str(model_dir),
        data_dir=str(data_dir),
        state_dir=str(state),
        pki_dir=str(state / "unused-pki"),
        **config,
    )
    train = tokenize(load_jsonl(data_dir / "train.jsonl"), tok)[:n_train]
    eval_data = tokenize(load_jsonl(data_dir / "eval.jsonl"), tok)[:n_eval]
    return assemble_node(config, host, train=train, eval_data=eval_data)
