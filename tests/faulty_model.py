"""A tiny Llama model directory whose forward pass fails on command, for fault-injection tests.

The server loads it like any model with custom code (`--trust-remote-code`, an `auto_map`
in config.json), so the faults travel the real path: server process, engine thread, model
step. The test arms a fault by writing one word to the file named by $FAULT_FILE_ENV:

    decode:error   the next decode-only step raises RuntimeError
    prefill:error  the next step that feeds a prompt chunk raises RuntimeError
    decode:oom     the next decode-only step raises torch.OutOfMemoryError (CUDA's, as on a GPU)
    prefill:oom    the next step with a prompt chunk raises it
    any:fatal      the next step raises a BaseException the engine does not handle: its loop dies

The forward that fires removes the file, so each fault fires once.
"""

from __future__ import annotations

import json
from pathlib import Path

from modelserve.models.random_init import build_random_model

FAULT_FILE_ENV = "MODELSERVE_TEST_FAULT_FILE"

_MODELING = '''
import os

import torch
from transformers import LlamaForCausalLM

from modelserve.engine.attention import current


class InjectedFatalError(BaseException):
    """Not an Exception: nothing in the engine's step handles it."""


class FaultyLlamaForCausalLM(LlamaForCausalLM):
    def forward(self, input_ids=None, **kwargs):
        path = os.environ.get("FAULT_FILE_ENV", "")
        if path and input_ids is not None and os.path.exists(path):
            phase, _, kind = open(path).read().strip().partition(":")
            step = current()  # an engine step: does it feed a prompt chunk beside the decoding rows?
            prefill = bool(step.prefills) if step is not None else input_ids.shape[1] > 1
            this_phase = "prefill" if prefill else "decode"
            if phase in (this_phase, "any"):
                os.remove(path)
                if kind == "oom":
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
                if kind == "fatal":
                    raise InjectedFatalError("injected by the test")
                raise RuntimeError("model step failed (injected by the test)")
        return super().forward(input_ids=input_ids, **kwargs)
'''.replace('"FAULT_FILE_ENV"', repr(FAULT_FILE_ENV))


def build_faulty_model(out_dir: Path, max_len: int = 2048) -> Path:
    build_random_model(out_dir, "llama", seed=7, max_len=max_len)
    (out_dir / "modeling_faulty.py").write_text(_MODELING)
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_faulty.FaultyLlamaForCausalLM"}
    config_path.write_text(json.dumps(config, indent=2))
    return out_dir
