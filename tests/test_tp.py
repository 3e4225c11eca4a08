"""Tensor parallelism (transformers tp_plan="auto", gloo on the CPU, 2 processes):
each rank runs SparQ over its own heads; generation equals the single-process one, through
Hugging Face generate and through the fast decode loop (FastDecoder)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
import transformers as tf

import tp_worker


def test_tensor_parallel_generation_equals_single_process(tmp_path):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.2, pad_token_id=0, tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "model")
    single = tp_worker.run(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval())
    fast = tp_worker.run_fast(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval())
    assert fast["dense"] == single["dense"] and fast["sparq"] == single["sparq"]
    assert single["sparq_generate_fast"] == single["sparq"] and single["heads_generate_fast"] == [4, 2]
    assert single["heads"] == [(4, 2)]
    assert single["sparq"] != single["dense"], "budget too loose: SparQ should change some tokens here"

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(29500 + os.getpid() % 1000)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_port", env["MASTER_PORT"], tp_worker.__file__, str(tmp_path / "model"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert got["heads"] == [[2, 1]], got["heads"]  # half the query and KV heads per rank
        assert got["dense"] == single["dense"]
        assert got["sparq"] == single["sparq"]
        assert got["sparq_generate_fast"] == single["sparq"] and got["heads_generate_fast"] == [2, 1]
        for key in ("fast", "fast_local"):  # the fast loop: transformers' DTensor shards, and plain slices
            assert got[key]["heads"] == [2, 1], (key, got[key]["heads"])
            assert got[key]["dense"] == single["dense"], key
            assert got[key]["sparq"] == single["sparq"], key
